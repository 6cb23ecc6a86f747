"""PackedBinaryLinear: the *inference* 1-bit linear layer.  It holds only packed sign bits (``weight``: uint8,
8 weights a byte, shape (out, ceil(in/8))), an fp16 per-row scale (``weight_scale``), an optional fp16 input scale and an optional bias; each call unpacks the
bits (a temporary, never stored) and computes ``scale * (sign(W) @ (x * input_scale)) + bias``."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..export.bits import pack_signs, unpack_signs


class PackedBinaryLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, input_scale: bool = False,
                 device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, (in_features + 7) // 8, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float16, device=device))
        self.register_buffer("input_scale", torch.ones(in_features, dtype=torch.float16, device=device)
                             if input_scale else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.bfloat16, device=device) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_binary(cls, m) -> "PackedBinaryLinear":
        """From a training BinaryLinear: its frozen form sign(W~) and S_l * S_a."""
        signs, scale = m.freeze()
        p = cls(m.in_features, m.out_features, bias=m.bias is not None, input_scale=m.input_scale is not None,
                device=m.weight.device)
        p.weight.copy_(pack_signs(signs))
        p.weight_scale.copy_(scale.to(torch.float16))
        if m.input_scale is not None:
            p.input_scale.copy_(m.input_scale.to(torch.float16))
        if m.bias is not None:
            p.bias.copy_(m.bias.to(torch.bfloat16))
        return p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype if x.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
        if torch.is_autocast_enabled(x.device.type):
            dt = torch.get_autocast_dtype(x.device.type)
        x = x.to(dt)
        if self.input_scale is not None:
            x = x * self.input_scale.to(dt)
        w = unpack_signs(self.weight, self.in_features, dt)
        y = torch.nn.functional.linear(x, w) * self.weight_scale.to(dt)
        if self.bias is not None:
            y = y + self.bias.to(dt)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, packed 1-bit, "
                f"bias={self.bias is not None}, input_scale={self.input_scale is not None}")
