"""PackedBinaryLinear: the *inference* 1-bit linear layer.  It holds only packed sign bits (``weight``: uint8,
8 weights a byte, shape (out, ceil(in/8))), an fp16 per-row scale (``weight_scale``), an optional fp16 input
scale and an optional bias, and computes ``scale * (sign(W) @ (x * input_scale)) + bias``:

* CUDA, bf16/fp16 activations: the Triton W1A16 kernel (``binaryllm.kernels.triton_w1a16``), straight from
  the bits (its int32 word layout is a view of the stored bytes when in_features % 32 == 0);
* CPU, up to 8 rows of activations (decode): the C lookup-table kernel (``binaryllm.kernels.cpu``);
* otherwise (fp32 on the GPU, long CPU inputs, or where a kernel is unavailable: one warning): the PyTorch
  reference path, which unpacks the bits to a dense temporary per call (never stored).

``use_kernels = False`` on a module (or ``binaryllm.nn.packed.USE_KERNELS = False``) forces the reference path."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..export.bits import pack_signs, unpack_signs

USE_KERNELS = True


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
        self.use_kernels = True
        self._words = None   # the Triton kernel's int32 word layout, made by words()
        self._tiles = None   # the mma decode kernel's tile layout, made by tiles()
        self.tile_pairs = 0  # > 0: two stacked halves of this many rows (a gate/up stack), tiled in pairs (nn/fuse.py)
        self._fused = None   # (FusedProjection, index) while fused with its siblings (nn/fuse.py)

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

    def words(self) -> torch.Tensor:
        """The kernel's int32 word layout (a view of ``weight`` when in_features % 32 == 0), made once; reset
        when a state dict is loaded into the layer.  No pointer checks at call time, so a compiled or
        graph-captured forward sees a plain tensor attribute."""
        if self._words is None or self._words.device != self.weight.device:
            from ..kernels.triton_w1a16 import prepare_weight
            self._words = prepare_weight(self.weight, self.in_features)
        return self._words

    def tiles(self) -> torch.Tensor | None:
        """The ``mma`` decode kernel's weight layout (``kernels/mma_w1a16.py``: one extra bit per weight in GPU
        memory), made once on a CUDA device where that kernel runs; None elsewhere.  Made outside torch.compile
        (``prepare_kernels``, or the first eager call): a compiled forward only reads it."""
        if self._tiles is not None and self._tiles.device == self.weight.device:
            return self._tiles
        if not self.weight.is_cuda or torch.compiler.is_compiling():
            return None
        from ..kernels import mma_w1a16
        if not mma_w1a16.usable(self.weight.device.index or 0):
            return None
        self._tiles = mma_w1a16.prepare_tiles(self.weight, self.in_features, self.tile_pairs)
        return self._tiles

    def _load_from_state_dict(self, *args, **kwargs):
        self._words = self._tiles = None
        if self._fused is not None:       # the buffers are views of the stacked layer: it changes with them
            self._fused[0].core._words = self._fused[0].core._tiles = None
        return super()._load_from_state_dict(*args, **kwargs)

    def _fast(self, x: torch.Tensor, dt: torch.dtype):
        if not (USE_KERNELS and self.use_kernels):
            return None
        if x.is_cuda and dt in (torch.bfloat16, torch.float16):
            from ..kernels import triton_usable
            if triton_usable(x.device.index or 0):
                s_in = self.input_scale.to(dt) if self.input_scale is not None else None
                b = self.bias.to(dt) if self.bias is not None else None
                tiles = self.tiles() if x.numel() <= 16 * self.in_features else None
                if torch.compiler.is_compiling():          # one opaque op for torch.compile (kernels/ops.py)
                    from ..kernels import ops
                    return ops.w1a16(x.to(dt), self.words(), self.weight_scale, self.in_features, s_in, b, tiles,
                                     self.tile_pairs)
                from ..kernels.triton_w1a16 import w1a16_matmul
                return w1a16_matmul(x.to(dt), self.words(), self.weight_scale, self.in_features, s_in, b,
                                    tiles=tiles, pairs=self.tile_pairs)
        elif x.device.type == "cpu" and x.numel() // self.in_features <= 8:
            from ..kernels import cpu, warn_once
            if cpu.available():
                if self.input_scale is not None:
                    x = x.to(dt) * self.input_scale.to(dt)
                if torch.compiler.is_compiling():
                    from ..kernels import ops
                    y = ops.w1_cpu(x, self.weight, self.weight_scale, self.in_features)
                else:
                    y = cpu.w1_matmul_cpu(x, self.weight, self.weight_scale, self.in_features)
                if self.bias is not None:
                    y = y + self.bias.float()
                return y.to(dt)
            warn_once("no-cpu-kernel", "the CPU 1-bit kernel is unavailable: using the PyTorch path")
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused is not None:
            group, k = self._fused
            if group.core.weight.device == x.device:
                return group(x, k)
        dt = x.dtype if x.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
        if torch.is_autocast_enabled(x.device.type):
            dt = torch.get_autocast_dtype(x.device.type)
        y = self._fast(x, dt)
        if y is not None:
            return y
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


@torch.no_grad()
def prepare_kernels(model: nn.Module) -> int:
    """Make every packed layer's kernel layouts now (word view, and the ``mma`` tiles where that kernel runs), so
    that neither a CUDA-graph capture nor torch.compile meets a first call that builds them.  Returns the number
    of layers (fused stacks included) prepared."""
    n = 0
    seen = set()
    for m in model.modules():
        if isinstance(m, PackedBinaryLinear):
            layer = m._fused[0].core if m._fused is not None else m
            if id(layer) in seen or not layer.weight.is_cuda:
                continue
            seen.add(id(layer))
            layer.words()
            layer.tiles()
            n += 1
    return n
