"""One probe forward pass with hooks.  ``train.init`` (which layers share an input, and which norm made it) and
``nn.fuse`` (which packed layers can run as one matmul) both group layers by the exact tensor object they read:
no names, no architecture table."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn


@torch.no_grad()
def probe_pass(model: nn.Module, input_ids: torch.Tensor, modules: list[nn.Module],
               pre: Callable | None = None, post: Callable | None = None, **forward_kw) -> None:
    """``model(input_ids=input_ids, **forward_kw)`` once, in eval mode and without gradients, with forward
    pre-hooks ``pre(module, args)`` and hooks ``post(module, args, output)`` on ``modules``; the hooks are removed
    and the training mode restored afterwards, also when the pass fails.  Hooks that key tensors by ``id`` must
    keep them alive until the pass ends (a freed tensor's id is reused)."""
    handles = []
    for m in modules:
        if pre is not None:
            handles.append(m.register_forward_pre_hook(pre))
        if post is not None:
            handles.append(m.register_forward_hook(post))
    was_training = model.training
    model.eval()
    try:
        model(input_ids=input_ids, **forward_kw)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()


def group_by_input(model: nn.Module, layers: list[nn.Module], input_ids: torch.Tensor,
                   **forward_kw) -> list[list[nn.Module]]:
    """``layers`` grouped by the tensor their first argument was in one probe pass, each group in call order
    (a layer called twice on one tensor counts once; layers that did not run are left out)."""
    keep: list[torch.Tensor] = []
    by_input: dict[int, list[nn.Module]] = {}

    def pre(mod, args):
        if args and isinstance(args[0], torch.Tensor):
            keep.append(args[0])
            group = by_input.setdefault(id(args[0]), [])
            if mod not in group:
                group.append(mod)
    probe_pass(model, input_ids, layers, pre=pre, **forward_kw)
    return list(by_input.values())
