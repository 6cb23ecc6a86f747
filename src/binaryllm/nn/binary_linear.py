"""BinaryLinear: the *training* ("fake") 1-bit linear layer with latent float weights.

Forward: ``y = (x * S_t) @ W_q^T + b`` with ``W_q = S_l * S_a * f(W~ / S_a)`` (see ``quant.progressive``).

* ``weight``      -- latent W~ (out, in), trained;
* ``scale_l``     -- S_l (out,), learnable per-row scale, init 1 (frozen at 1 when dual scaling is off);
* ``input_scale`` -- optional S_t (in,) buffer left by binary-aware init where it could not be folded
  into a preceding norm;
* ``kind``/``t``  -- which binarizer runs and its temperature; set by the trainer every step.

The packed inference module is a separate class (``binaryllm.nn.packed``, issue 4); ``freeze`` gives the
values it needs: sign(W~) and the merged per-row scale S_l * S_a.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..quant import hard_binarize, scaled_binarize


class BinaryLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, sa_grad: bool = False,
                 ste_clip: float = 1.0, device=None, dtype=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.scale_l = nn.Parameter(torch.ones(out_features, device=device, dtype=dtype))
        self.register_buffer("input_scale", None)
        self.kind = "cpt"
        # t lives in a 0-d buffer as well as a Python float: a compiled step reads the buffer, so a new t is
        # new data for the same graph (set it through ``m.t = value``)
        self.register_buffer("t_buf", torch.ones((), device=device, dtype=torch.float32), persistent=False)
        self._t = 1.0
        self.sa_grad = sa_grad
        self.ste_clip = ste_clip
        # stage 1 (binary-aware init): a shared log-scale parameter, set by train.init
        self.init_log_scale: nn.Parameter | None = None
        # optional index map: S_t = exp(init_log_scale[init_scale_index]) (a scale tied across channels)
        self.init_scale_index: torch.Tensor | None = None
        # a fixed W_q used instead of recomputing it (only inside weight_cache(), for inference-only checks)
        self.wq_cache: torch.Tensor | None = None

    @property
    def t(self) -> float:
        return self._t

    @t.setter
    def t(self, value: float) -> None:
        self._t = float(value)
        with torch.no_grad():
            self.t_buf.fill_(self._t)

    @classmethod
    def from_linear(cls, lin: nn.Module, transposed: bool = False, **kw) -> "BinaryLinear":
        """From nn.Linear, or from GPT-2's Conv1D (``transposed=True``: weight stored as (in, out))."""
        w = lin.weight.detach()
        if transposed:
            w = w.t()
        out_f, in_f = w.shape
        m = cls(in_f, out_f, bias=lin.bias is not None, device=w.device, dtype=w.dtype, **kw)
        with torch.no_grad():
            m.weight.copy_(w)
            if lin.bias is not None:
                m.bias.copy_(lin.bias.detach())
        return m

    def set_input_scale(self, s: torch.Tensor | None) -> None:
        self.input_scale = None if s is None else s.detach().clone().to(self.weight.device, self.weight.dtype)

    def quantized_weight(self) -> torch.Tensor:
        """W_q as used by forward (float, differentiable)."""
        w, s_l = self.weight, self.scale_l
        if self.init_log_scale is not None:
            # stage 1: W frozen, W / S_t binarized with hard sign; only S_t (through S_a and the input
            # path) receives gradient.  sign(W/S_t) = sign(W), so the gradient is exact: no estimator.
            s_t = self.init_scale()
            return scaled_binarize(w.detach() / s_t, s_l.detach(), "sign", self.t_buf, sa_grad=True)
        return scaled_binarize(w, s_l, self.kind, self.t_buf, self.sa_grad, self.ste_clip)

    def init_scale(self) -> torch.Tensor:
        """Stage 1's input scale S_t (differentiable)."""
        u = self.init_log_scale
        return (u if self.init_scale_index is None else u[self.init_scale_index]).exp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.init_log_scale is not None:
            x = x * self.init_scale().to(x.dtype)
        elif self.input_scale is not None:
            x = x * self.input_scale.to(x.dtype)
        w = self.wq_cache if self.wq_cache is not None else self.quantized_weight()
        if not torch.is_autocast_enabled(x.device.type):
            w = w.to(x.dtype)
        return F.linear(x, w, self.bias)

    @torch.no_grad()
    def freeze(self):
        """(sign bits as ±1 float, merged per-row scale) -- the exact inference weights."""
        return hard_binarize(self.weight, self.scale_l)

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        s += f", kind={self.kind}, t={self.t:.4g}"
        if self.input_scale is not None:
            s += ", input_scale"
        return s


class weight_cache:
    """Context manager for no-grad passes that leave the weights alone: each layer's W_q is computed once
    on entry (``refresh(m)`` after changing a layer's weight) instead of at every forward pass."""

    def __init__(self, modules):
        self.mods = list(modules)

    @staticmethod
    @torch.no_grad()
    def refresh(m: BinaryLinear) -> None:
        m.wq_cache = None
        m.wq_cache = m.quantized_weight().detach()

    def __enter__(self):
        for m in self.mods:
            self.refresh(m)
        return self

    def __exit__(self, *exc):
        for m in self.mods:
            m.wq_cache = None
        return False
