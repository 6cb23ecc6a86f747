"""Sign bits <-> bytes.  Format v1: row-major; weight j of a row is bit (j % 8) of byte j // 8 of that row
(least significant bit first); bit 1 = +1, bit 0 = -1; a row of n weights takes ceil(n / 8) bytes, the
unused high bits of the last byte are 0."""
from __future__ import annotations

import torch

BIT_ORDER = "lsb-first"
_WEIGHTS = (1 << torch.arange(8, dtype=torch.int32)).to(torch.uint8)


def pack_signs(w: torch.Tensor) -> torch.Tensor:
    """(out, n) real tensor -> (out, ceil(n/8)) uint8; entries >= 0 count as +1."""
    out, n = w.shape
    nb = (n + 7) // 8
    bits = torch.zeros(out, nb * 8, dtype=torch.uint8, device=w.device)
    bits[:, :n] = (w >= 0).to(torch.uint8)
    return (bits.view(out, nb, 8) * _WEIGHTS.to(w.device)).sum(dim=2, dtype=torch.int32).to(torch.uint8)


def unpack_signs(packed: torch.Tensor, n: int, dtype=torch.float32) -> torch.Tensor:
    """(out, nb) uint8 -> (out, n) tensor of ±1 in ``dtype``."""
    out, nb = packed.shape
    bits = (packed.unsqueeze(-1) >> torch.arange(8, device=packed.device, dtype=torch.uint8)) & 1
    return (bits.view(out, nb * 8)[:, :n].to(dtype) * 2 - 1)
