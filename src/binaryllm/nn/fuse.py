"""Fused projections for decoding: packed layers that read the same input (a block's q/k/v, its gate/up) run as
one packed matmul with their rows stacked, instead of one kernel each.

At batch 1 a token costs one small 1-bit GEMV per projection; k and v of a GQA model are tiny (SmolLM2: 576 x 192)
and cost a launch and a ramp-up each for a few microseconds of reading.  ``fuse_projections(model)`` finds the
groups by running one short probe forward (layers fed by the *same tensor object*, as in ``train.init``: no
names, no architecture table), stacks each group's packed rows and scales into one ``PackedBinaryLinear`` (the
members' buffers become views of it: no extra memory), and marks the members.  At run time the first member
called with an input computes the whole group's output for it; the others return their slice of it when called
with that same tensor (same object, unchanged version counter), and compute on their own otherwise.  The model's
code is not touched: Hugging Face attention still calls q_proj, k_proj and v_proj one after the other.

Under ``torch.compile`` the same Python logic runs at trace time: the traced step calls the stacked layer once
per group and slices it, in one graph (tested).  The members' buffers share storage while fused, which
safetensors refuses to save: ``unfuse_projections(model)`` gives each its own copy again (``save_packed`` says
so if you forget).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .packed import PackedBinaryLinear
from .probe import group_by_input


class FusedProjection:
    """The stacked layer of one group and the output it computed last (kept until every member took its part)."""

    def __init__(self, members: list[PackedBinaryLinear]):
        first = members[0]
        self.sizes = [m.out_features for m in members]
        has_bias = any(m.bias is not None for m in members)
        core = PackedBinaryLinear(first.in_features, sum(self.sizes), bias=has_bias,
                                  input_scale=first.input_scale is not None, device=first.weight.device)
        with torch.no_grad():
            core.weight.copy_(torch.cat([m.weight for m in members]))
            core.weight_scale.copy_(torch.cat([m.weight_scale for m in members]))
            if first.input_scale is not None:
                core.input_scale.copy_(first.input_scale)
            if has_bias:
                core.bias.copy_(torch.cat([m.bias.to(core.bias.dtype) if m.bias is not None
                                           else core.bias.new_zeros(m.out_features) for m in members]))
        core.use_kernels = first.use_kernels
        if len(self.sizes) == 2 and self.sizes[0] == self.sizes[1] and self.sizes[0] % 8 == 0:
            # two equal halves (a gated MLP's gate and up): the mma tiles pair their rows, so that a compiled step
            # can make silu(gate) * up in the kernel's epilogue (kernels/fusion.py); the output is the same
            core.tile_pairs = self.sizes[0]
        self.core = core
        self._x: torch.Tensor | None = None
        self._version = -1
        self._parts: tuple[torch.Tensor, ...] = ()
        self._pending: set[int] = set()

    def __call__(self, x: torch.Tensor, index: int) -> torch.Tensor:
        # the version counter catches an input changed in place between two members' calls; under torch.compile
        # it is not traceable (a data-dependent value) and the traced step holds no such in-place change
        if x is self._x and index in self._pending and (torch.compiler.is_compiling() or x._version == self._version):
            y = self._parts[index]
            self._pending.discard(index)
        else:
            y_all = self.core(x)
            self._parts = tuple(y_all.split(self.sizes, dim=-1))
            self._x, self._version = x, (-1 if torch.compiler.is_compiling() else x._version)
            self._pending = set(range(len(self.sizes))) - {index}
            y = self._parts[index]
        if not self._pending:         # every member served: drop the references (long prefills hold no memory)
            self._x, self._parts = None, ()
        return y


def _same_input_scale(members: list[PackedBinaryLinear]) -> bool:
    s = [m.input_scale for m in members]
    if all(v is None for v in s):
        return True
    return all(v is not None for v in s) and all(torch.equal(s[0], v) for v in s[1:])


@torch.no_grad()
def fuse_projections(model: nn.Module, probe_ids: torch.Tensor | None = None) -> list[list[str]]:
    """Fuse every group of packed layers that read the same input (see the module docstring).  Returns the groups
    fused, as lists of module names in call order.  Idempotent: fused layers are left as they are."""
    names = {m: n for n, m in model.named_modules()}
    packed = [m for m in names if isinstance(m, PackedBinaryLinear) and m._fused is None]
    if not packed:
        return []
    dev = packed[0].weight.device
    if probe_ids is None:
        probe_ids = torch.zeros(1, 2, dtype=torch.long, device=dev)
    groups = group_by_input(model, packed, probe_ids, use_cache=False)
    fused = []
    for members in groups:
        if len(members) < 2 or len({(m.in_features, m.weight.device) for m in members}) != 1 \
                or not _same_input_scale(members):
            continue
        group = FusedProjection(members)
        start = 0
        for k, m in enumerate(members):
            end = start + m.out_features
            m.weight = group.core.weight[start:end]              # views: the stacked copy is the only one
            m.weight_scale = group.core.weight_scale[start:end]
            if m.bias is not None:
                m.bias = group.core.bias[start:end].to(m.bias.dtype)
            m._words = m._tiles = None
            m._fused = (group, k)
            start = end
        fused.append([names[m] for m in members])
    return fused


@torch.no_grad()
def unfuse_projections(model: nn.Module) -> int:
    """Undo ``fuse_projections``: every member gets its own storage back.  Returns the number of layers unfused."""
    n = 0
    for m in model.modules():
        if isinstance(m, PackedBinaryLinear) and m._fused is not None:
            m.weight = m.weight.clone()
            m.weight_scale = m.weight_scale.clone()
            if m.bias is not None:
                m.bias = m.bias.clone()
            m._words = m._tiles = None
            m._fused = None
            n += 1
    return n
