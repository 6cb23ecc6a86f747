"""Weight binarizers as pure torch math: the fused "scaled binarizer" autograd function.

A binarized weight is ``W_q = S_l * S_a * f(W / S_a)`` where ``S_a`` is the per-output-row mean of
``|W|`` and ``S_l`` a learnable per-row scale.  ``f`` is one of:

* ``cpt``   -- ``F(x, t) = tanh(t x) / tanh(t)`` forward, its exact derivative backward;
* ``ste``   -- ``sign(x)`` forward, clipped identity ``1{|x| <= clip}`` backward;
* ``irnet`` -- ``sign(x)`` forward, ``k t (1 - tanh(t x)^2)`` backward with ``k = max(1/t, 1)``;
* ``hard``  -- ``sign(x)`` forward, backward of the CPT derivative at the given t (used by the final
  hard-sign phase when asked to keep the CPT backward);
* ``sign``  -- ``sign(x)`` forward with its true (zero) derivative: inference, and stage 1 of the
  binary-aware init where only the scales receive gradient (through ``S_a``);
* ``identity`` -- no binarization (a float model through the same code path).

The whole chain (row scale, normalisation, binarizer, rescale) is one autograd function, so the
backward pass saves only the latent weight and ``S_l`` (both are leaves the optimizer keeps anyway) and
recomputes the cheap elementwise parts.  ``S_a`` may or may not pass gradients (``sa_grad``).
"""
from __future__ import annotations

import math

import torch

# Below this t, F(x, t) equals x to within t^2/3 (relative); we use the identity exactly there.
T_IDENTITY = 1e-4

KINDS = ("cpt", "ste", "irnet", "hard", "sign", "identity")


def sign(x: torch.Tensor) -> torch.Tensor:
    """sign with sign(0) = +1, so every weight maps to exactly one of {-1, +1}."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def progressive(x: torch.Tensor, t) -> torch.Tensor:
    """F(x, t) = tanh(t x) / tanh(t) (no autograd function: plain torch ops).  ``t``: a float, or a 0-d tensor
    (what a compiled training step uses, so that a new t is data, not a new graph); for a tensor t below
    T_IDENTITY, t is clamped to it (F then equals x to ~1e-8 relative, times x^2)."""
    if isinstance(t, torch.Tensor):
        t = t.to(x.dtype).clamp_min(T_IDENTITY)
        return torch.tanh(t * x) / torch.tanh(t)
    if t < T_IDENTITY:
        return x
    return torch.tanh(t * x) / math.tanh(t)


def progressive_grad(x: torch.Tensor, t) -> torch.Tensor:
    """dF/dx = t (1 - tanh(t x)^2) / tanh(t); written as (1-y)(1+y) to stay accurate near |y| = 1."""
    if isinstance(t, torch.Tensor):
        t = t.to(x.dtype).clamp_min(T_IDENTITY)
        y = torch.tanh(t * x)
        return (t / torch.tanh(t)) * (1.0 - y) * (1.0 + y)
    if t < T_IDENTITY:
        return torch.ones_like(x)
    y = torch.tanh(t * x)
    return (t / math.tanh(t)) * (1.0 - y) * (1.0 + y)


def _forward_fn(kind: str, x: torch.Tensor, t: float) -> torch.Tensor:
    if kind == "cpt":
        return progressive(x, t)
    if kind in ("ste", "irnet", "hard", "sign"):
        return sign(x)
    if kind == "identity":
        return x
    raise ValueError(f"unknown binarizer kind {kind!r}; known: {', '.join(KINDS)}")


def _backward_fn(kind: str, x: torch.Tensor, t: float, clip: float) -> torch.Tensor:
    if kind in ("cpt", "hard"):
        return progressive_grad(x, t)
    if kind == "ste":
        return (x.abs() <= clip).to(x.dtype)
    if kind == "irnet":
        if isinstance(t, torch.Tensor):
            t = t.to(x.dtype)
        k = (1.0 / t).clamp_min(1.0) if isinstance(t, torch.Tensor) else max(1.0 / t, 1.0)
        y = torch.tanh(t * x)
        return (k * t) * (1.0 - y) * (1.0 + y)
    if kind == "identity":
        return torch.ones_like(x)
    if kind == "sign":
        return torch.zeros_like(x)
    raise ValueError(f"unknown binarizer kind {kind!r}; known: {', '.join(KINDS)}")


def row_scale(w: torch.Tensor) -> torch.Tensor:
    """S_a: mean |W| of each output row, shape (out, 1); never exactly 0."""
    return w.abs().mean(dim=1, keepdim=True).clamp_min(1e-8)


class ScaledBinarize(torch.autograd.Function):
    """W_q = S_l * S_a * f(W / S_a); saves only W and S_l for backward."""

    @staticmethod
    def forward(ctx, w, s_l, t, kind: str, sa_grad: bool, clip: float):
        # t: a 0-d tensor (no gradient)
        sa = row_scale(w)
        x = w / sa
        out = (s_l.view(-1, 1) * sa) * _forward_fn(kind, x, t)
        ctx.save_for_backward(w, s_l, t)
        ctx.cfg = (kind, sa_grad, clip)
        return out

    @staticmethod
    def backward(ctx, g):
        w, s_l, t = ctx.saved_tensors
        kind, sa_grad, clip = ctx.cfg
        sa = row_scale(w)
        x = w / sa
        y = _forward_fn(kind, x, t)
        s_l2 = s_l.view(-1, 1)
        grad_sl = None
        if ctx.needs_input_grad[1]:
            grad_sl = (g * y).sum(dim=1, keepdim=True).mul_(sa).view_as(s_l)
        grad_w = None
        if ctx.needs_input_grad[0]:
            dfx = _backward_fn(kind, x, t, clip)
            gs = g * s_l2
            grad_w = gs * dfx
            if sa_grad:
                # dL/dS_a = sum_j g S_l (f(x) - x f'(x)); dS_a/dW = sign(W) / n
                g_sa = (gs * (y - x * dfx)).sum(dim=1, keepdim=True)
                grad_w = grad_w + g_sa * torch.sign(w) / w.shape[1]
        return grad_w, grad_sl, None, None, None, None


def scaled_binarize(w: torch.Tensor, s_l: torch.Tensor, kind: str = "cpt", t=1.0,
                    sa_grad: bool = False, clip: float = 1.0) -> torch.Tensor:
    """Fused dual-scaled binarizer (see module docstring). ``w``: (out, in); ``s_l``: (out,); ``t``: float or
    0-d tensor."""
    if kind not in KINDS:
        raise ValueError(f"unknown binarizer kind {kind!r}; known: {', '.join(KINDS)}")
    if not isinstance(t, torch.Tensor):
        t = torch.tensor(float(t), dtype=w.dtype if w.is_floating_point() else torch.float32, device=w.device)
    return ScaledBinarize.apply(w, s_l, t.detach(), kind, bool(sa_grad), float(clip))


def scaled_binarize_reference(w, s_l, kind="cpt", t=1.0, sa_grad=False, clip=1.0):
    """The same map written with plain autograd ops, used only to test the fused function."""
    sa = w.abs().mean(dim=1, keepdim=True).clamp_min(1e-8)
    if not sa_grad:
        sa = sa.detach()
    x = w / sa
    fwd = _forward_fn(kind, x, t)
    # value of fwd, gradient of the chosen backward: fwd.detach() + (h - h.detach()) with h' = f'
    if kind == "sign":
        fwd = fwd.detach()
    if kind in ("ste", "irnet", "hard"):
        if kind == "ste":
            h = x.clamp(-clip, clip)
        elif kind == "irnet":
            h = max(1.0 / t, 1.0) * torch.tanh(t * x)
        else:
            h = progressive(x, t)
        fwd = fwd.detach() + (h - h.detach())
    return s_l.view(-1, 1) * sa * fwd


def hard_binarize(w: torch.Tensor, s_l: torch.Tensor | None = None):
    """Freeze: (sign(W), merged per-row scale S = S_l * S_a) -- the inference form."""
    sa = row_scale(w).view(-1)
    scale = sa if s_l is None else sa * s_l.view(-1)
    return sign(w), scale
