"""Binary-aware initialization (stage 1 of the method).

Every binarized layer gets a per-input-channel scale S_t = exp(u) (u = 0, so S_t = 1 at first).  With
the pre-trained weights W frozen, the layer computes ``binarize(W diag(S_t)^-1) (S_t * x)``: with no
binarization this is exactly ``W x``, so the full-precision function is unchanged.  Stage 1 trains only u,
a few dozen steps of next-token loss *of the hard-sign binarized model*: since sign(W/S_t) = sign(W),
S_t acts through the row scale S_a = mean|W/S_t| and through the input, and its gradient is exact.

Choices where the paper is silent (documented in docs/METHOD.md):
* Linear layers that read the very same input tensor (q/k/v; gate/up) share one S_t, so that it can be
  folded into the norm that produced that input.
* Afterwards the latent weight becomes ``W~ = W / S_t``.  Where the group's input comes straight from a
  norm layer that feeds nothing else, S_t is folded into that norm's weight (and bias); the fold rule is
  found numerically (``w*S`` for LayerNorm/RMSNorm, ``(1+w)*S - 1`` for Gemma-style norms).
* Elsewhere S_t is folded, where that is exact, into the rows of a binarized layer of the same block that
  produces this input linearly (down_proj's input = act(gate) * up: into up_proj; o_proj's input: into
  v_proj).  Scaling a latent row by s scales its S_a by s and leaves W~/S_a unchanged, so the binarized row
  scales by exactly s.  Such folds are planned *before* stage 1, each checked on the model with a random
  scale, and S_t is then tied to one value per upstream row.  Under grouped-query attention each value row
  feeds several query heads, so o_proj's S_t is shared across the heads of a KV group (head size from the
  model config): that keeps it foldable, so an exported model is a plain graph with no extra multiply
  (llama.cpp has none to offer).
* The whole model is checked to compute the same logits after all folds, else every fold is undone.
  What cannot be folded stays on the layer as a fixed input-scale vector.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..api import binary_modules
from ..nn import BinaryLinear, find_blocks, weight_cache
from ..nn.probe import probe_pass


@dataclass
class InputGroup:
    members: list[str]
    norm: str | None = None          # producing norm module, if foldable
    norm_input: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    folded: bool = False
    consumers: list[str] = field(default_factory=list)


def _norm_like(m: nn.Module, width: int) -> bool:
    w = getattr(m, "weight", None)
    return (isinstance(w, torch.Tensor) and w.dim() == 1 and w.numel() == width
            and len(list(m.children())) == 0 and not isinstance(m, (nn.Linear, nn.Embedding, BinaryLinear)))


@torch.no_grad()
def find_input_groups(model: nn.Module, input_ids: torch.Tensor) -> list[InputGroup]:
    """Run one forward pass with hooks; group binarized layers by the exact input tensor they read."""
    names = {m: n for n, m in model.named_modules()}
    keep: list[torch.Tensor] = []          # hold every seen tensor so ids stay unique during the pass
    produced: dict[int, str] = {}
    consumers: dict[int, list[str]] = {}
    linear_in: dict[str, int] = {}
    inputs_of: dict[str, torch.Tensor] = {}

    def pre(mod, args):
        if args and isinstance(args[0], torch.Tensor):
            x = args[0]
            keep.append(x)
            consumers.setdefault(id(x), []).append(names[mod])
            if isinstance(mod, BinaryLinear):
                linear_in[names[mod]] = id(x)
            inputs_of.setdefault(names[mod], x)

    def post(mod, args, out):
        if isinstance(out, torch.Tensor):
            keep.append(out)
            produced[id(out)] = names[mod]

    probe_pass(model, input_ids, [m for m in model.modules() if len(list(m.children())) == 0], pre, post)
    by_input: dict[int, list[str]] = {}
    for n, i in linear_in.items():
        by_input.setdefault(i, []).append(n)
    modules = dict(model.named_modules())
    groups = []
    for i, members in by_input.items():
        g = InputGroup(members=sorted(members), consumers=sorted(consumers.get(i, [])))
        src = produced.get(i)
        width = modules[members[0]].in_features
        if src is not None and _norm_like(modules[src], width) and set(g.consumers) == set(members):
            g.norm, g.norm_input = src, inputs_of.get(src)
        groups.append(g)
    # layers that never ran (unused branches) still get their own group
    seen = {n for g in groups for n in g.members}
    groups += [InputGroup(members=[n]) for n in binary_modules(model) if n not in seen]
    return groups


def _try_fold(norm: nn.Module, x: torch.Tensor, s: torch.Tensor) -> bool:
    """Fold S into the norm so that norm'(x) == norm(x) * S; try the known parametrisations in turn."""
    w0 = norm.weight.detach().clone()
    b = getattr(norm, "bias", None)
    b0 = b.detach().clone() if isinstance(b, torch.Tensor) else None
    ref = norm(x) * s.to(x.dtype)
    tol = 1e-4 * ref.abs().max().item() + 1e-6
    for rule in ("scale", "one_plus"):
        with torch.no_grad():
            if rule == "scale":
                norm.weight.copy_(w0 * s)
            else:
                norm.weight.copy_((1 + w0) * s - 1)
            if b0 is not None:
                b.copy_(b0 * s)
        if (norm(x) - ref).abs().max().item() <= tol:
            return True
    with torch.no_grad():
        norm.weight.copy_(w0)
        if b0 is not None:
            b.copy_(b0)
    return False


def _block_of(name: str, blocks_name: str) -> str:
    rest = name[len(blocks_name) + 1:] if blocks_name else name
    return f"{blocks_name}.{rest.split('.')[0]}"


def _channel_maps(model, width: int, rows: int) -> list[torch.Tensor]:
    """Ways an upstream layer with ``rows`` outputs can feed an input of ``width`` channels: channel j
    reads row map[j].  Equal widths: the identity.  Grouped-query attention (o_proj reads the attention
    output; each KV head's value rows serve ``width / rows`` query heads): the head-repeat map, which needs
    the head size from the model config; a plain tiling as another candidate.  Each is checked numerically."""
    j = torch.arange(width)
    if rows == width:
        return [j]
    if width % rows:
        return []
    cfg = getattr(model, "config", None)
    hd = getattr(cfg, "head_dim", None) or (
        getattr(cfg, "hidden_size", 0) // max(getattr(cfg, "num_attention_heads", 1) or 1, 1))
    maps = []
    if hd and rows % hd == 0 and width % hd == 0:
        rep = width // rows
        maps.append((j // hd // rep) * hd + j % hd)
    maps.append(j % rows)
    return maps


@torch.no_grad()
def block_runners(model, probe_ids: torch.Tensor) -> dict:
    """One forward pass of the probe; for every decoder block, a function that reruns just that block on the
    inputs (positional and keyword: hidden states, rotary embeddings, masks) it got, returning its output.  A
    change inside one block changes the model's output exactly when it changes that block's output, so checks of
    such changes need one block, not the whole model (30x fewer layers on SmolLM2)."""
    blocks_name, blocks = find_blocks(model)
    seen: dict[int, tuple] = {}
    handles = [b.register_forward_pre_hook(lambda mod, args, kwargs, i=i: seen.__setitem__(i, (args, kwargs)),
                                           with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        model(input_ids=probe_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()

    def runner(b, args, kwargs):
        def run() -> torch.Tensor:
            y = b(*args, **kwargs)
            return (y[0] if isinstance(y, (tuple, list)) else y).float()
        return run
    return {f"{blocks_name}.{i}" if blocks_name else str(i): runner(blocks[i], *seen[i]) for i in seen}


@torch.no_grad()
def _plan_upstream(model, mods: dict, g: InputGroup, blocks_name: str, runners: dict):
    """Find a binarized layer of the same block whose rows feed g's input linearly: (its name, map) with
    input channel j = row map[j] of that layer, or None.  Accepted only if, with a random scale R, scaling the
    candidate's rows by R computes what multiplying g's input by R[map] does (checked on the block's output, see
    ``block_runners``).  Then g's init scale is tied through the map (one value a row) and can be folded into
    those rows exactly."""
    block = _block_of(g.members[0], blocks_name)
    if block not in runners:
        return None
    run = runners[block]
    width = mods[g.members[0]].in_features
    gen = torch.Generator().manual_seed(0)
    for name, cand in mods.items():
        if name in g.members or not name.startswith(block + "."):
            continue
        for idx in _channel_maps(model, width, cand.out_features):
            r = torch.exp(0.5 * torch.randn(cand.out_features, generator=gen)).to(cand.weight.device)
            idx = idx.to(cand.weight.device)
            for n in g.members:
                mods[n].set_input_scale(r[idx])
            ref = run()
            for n in g.members:
                mods[n].set_input_scale(None)
            w0 = cand.weight.detach().clone()
            b0 = cand.bias.detach().clone() if cand.bias is not None else None
            _scale_rows(cand, r)
            got = run()
            cand.weight.copy_(w0)
            if b0 is not None:
                cand.bias.copy_(b0)
            weight_cache.refresh(cand)
            if (got - ref).abs().max().item() <= 1e-4 * ref.abs().max().item() + 1e-5:
                return name, idx
    return None


@torch.no_grad()
def _scale_rows(m: BinaryLinear, s: torch.Tensor) -> None:
    m.weight.mul_(s.to(m.weight.dtype).view(-1, 1))
    if m.bias is not None:
        m.bias.mul_(s.to(m.bias.dtype))
    if m.wq_cache is not None:
        weight_cache.refresh(m)


def binary_aware_init(model: nn.Module, batches, steps: int, lr: float, probe_ids: torch.Tensor,
                      fold: bool = True, autocast=None, log=None, loss_fn=None, accum: int = 1) -> dict:
    """Stage 1.  ``batches(k)`` gives micro-batch k (input ids); each of the ``steps`` optimizer steps averages the
    gradients of ``accum`` consecutive micro-batches (as training does with --grad-accum).  ``loss_fn(model, ids)``
    is the next-token loss (default: the model's own, from ``labels``; the trainer passes the chunked fused loss,
    so that stage 1 never holds the full logits either).  Returns a summary dict."""
    import contextlib
    autocast = autocast or contextlib.nullcontext
    mods = binary_modules(model)
    groups = find_input_groups(model, probe_ids)
    device = next(iter(mods.values())).weight.device
    plans: dict[int, tuple[str, torch.Tensor]] = {}
    if fold:  # where no norm can take a group's scale, look for upstream rows before training (ties S_t)
        blocks_name, _ = find_blocks(model)
        was_training = model.training
        model.eval()
        with weight_cache(mods.values()):
            runners = block_runners(model, probe_ids)
            for k, g in enumerate(groups):
                if g.norm is None:
                    plan = _plan_upstream(model, mods, g, blocks_name, runners)
                    if plan is not None:
                        plans[k] = plan
        model.train(was_training)
    for k, g in enumerate(groups):
        width = mods[g.members[0]].in_features
        idx = plans[k][1] if k in plans else None
        u = nn.Parameter(torch.zeros(width if idx is None else mods[plans[k][0]].out_features, device=device))
        for n in g.members:
            mods[n].init_log_scale = u
            mods[n].init_scale_index = idx
    params = list({id(m.init_log_scale): m.init_log_scale for m in mods.values()}.values())
    req = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    was_training = model.training
    model.train()
    for k in range(steps):
        step_loss = 0.0
        for j in range(accum):
            ids = batches(k * accum + j)
            with autocast():
                loss = model(input_ids=ids, labels=ids).loss if loss_fn is None else loss_fn(model, ids)
            (loss / accum).backward()
            step_loss += loss.item() / accum
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(step_loss)
        if log:
            log(k, losses[-1])
    scales = {}
    row_scales: dict[int, torch.Tensor] = {}
    for k, g in enumerate(groups):
        first = mods[g.members[0]]
        g.scale = first.init_scale().detach().float()
        if k in plans:
            row_scales[k] = first.init_log_scale.detach().exp().float()
        for n in g.members:
            m = mods[n]
            m.init_log_scale = None
            m.init_scale_index = None
            with torch.no_grad():
                m.weight.div_(g.scale.to(m.weight.dtype))
            m.set_input_scale(g.scale)
            scales[n] = g.scale
    for p, r in req.items():
        p.requires_grad_(r)
    folded_norms: list[str] = []
    folded_rows: list[str] = []
    if fold:
        model.eval()  # the checks compare two forward passes: no dropout
        with torch.no_grad():
            ref = model(input_ids=probe_ids).logits.float()
        modules = dict(model.named_modules())
        saved = {}
        saved_rows: dict[str, tuple] = {}
        for g in groups:
            if g.norm is None or g.norm_input is None:
                continue
            norm = modules[g.norm]
            saved[g.norm] = {k: v.detach().clone() for k, v in norm.named_parameters()}
            if _try_fold(norm, g.norm_input, g.scale.to(g.norm_input.dtype)):
                g.folded = True
                for n in g.members:
                    mods[n].set_input_scale(None)
                folded_norms.append(g.norm)
        for k, (name, _) in plans.items():
            g = groups[k]
            if g.folded:
                continue
            saved_rows[name] = (mods[name].weight.detach().clone(),
                                mods[name].bias.detach().clone() if mods[name].bias is not None else None)
            _scale_rows(mods[name], row_scales[k])
            for n in g.members:
                mods[n].set_input_scale(None)
            g.folded = True
            folded_rows.append(name)
        with torch.no_grad():
            new = model(input_ids=probe_ids).logits.float()
        tol = 1e-3 * ref.abs().max().item() + 1e-4
        if (new - ref).abs().max().item() > tol:  # some input was used outside the layers: undo all
            with torch.no_grad():
                for g in groups:
                    if g.folded:
                        if g.norm in saved:
                            for k, v in saved[g.norm].items():
                                dict(modules[g.norm].named_parameters())[k].copy_(v)
                        for n in g.members:
                            mods[n].set_input_scale(g.scale)
                        g.folded = False
                for name, (w0, b0) in saved_rows.items():
                    mods[name].weight.copy_(w0)
                    if b0 is not None:
                        mods[name].bias.copy_(b0)
            folded_norms, folded_rows = [], []
    model.train(was_training)
    info = getattr(model, "binaryllm_info", None)
    if info is not None:
        info["input_scales"] = sorted(n for n, m in mods.items() if m.input_scale is not None)
        info["folded_norms"] = sorted(folded_norms)
        info["folded_into_rows"] = sorted(folded_rows)
    return {"init_losses": losses, "groups": len(groups), "folded_norms": len(folded_norms),
            "folded_into_rows": len(folded_rows),
            "vector_scales": sum(1 for m in mods.values() if m.input_scale is not None), "scales": scales}
