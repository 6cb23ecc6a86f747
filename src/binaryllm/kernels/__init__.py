"""Fast paths for packed 1-bit layers: a Triton W1A16 kernel for CUDA (``triton_w1a16``) and a small C
lookup-table kernel for the CPU (``cpu``).  ``PackedBinaryLinear`` picks one per call and falls back to the
PyTorch reference path (unpack, dense matmul) with one warning where neither applies."""
from __future__ import annotations

import os
import warnings

import torch

_WARNED: set[str] = set()
DECODE_KERNELS = ("mma", "gemv", "tc")     # the CUDA decode kernels (1-16 rows); see triton_w1a16.DECODE_MODE
DECODE_ATTENTION = "binaryllm_decode"      # the decode attention's name in transformers' interfaces (attention.py)
# the Triton kernels run in Triton's interpreter (CPU tensors, no inline PTX, no PDL); Triton reads the variable when
# it decorates the kernels, at their modules' import
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def silu_mul(y: torch.Tensor, pairs: int) -> torch.Tensor:
    """silu(gate) * up of [gate | up] (..., 2 pairs), in y's dtype, rounded as eager PyTorch rounds it: the
    gated epilogue's arithmetic (``mma_w1a16``: GATED) for the paths without it."""
    return torch.nn.functional.silu(y[..., :pairs]) * y[..., pairs:]


def warn_once(key: str, msg: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"binaryllm: {msg}", stacklevel=3)


def env_ints(name: str, example: str) -> tuple[int, ...] | None:
    """The comma-separated integers in environment variable ``name`` (a kernel tile to try without editing
    code), None when it is unset or empty; anything else is a one-line error naming the variable."""
    v = os.environ.get(name, "").strip()
    if not v:
        return None
    try:
        return tuple(int(p) for p in v.split(","))
    except ValueError:
        from ..errors import BinaryLLMError
        raise BinaryLLMError(f"{name}={v!r} is not a comma-separated list of integers (e.g. {name}={example}); "
                             "fix or unset it") from None


_MAJOR: dict[int, int] = {}


def compute_major(device_index: int) -> int:
    """The major compute capability of a CUDA device, looked up once."""
    if device_index not in _MAJOR:
        import torch
        _MAJOR[device_index] = torch.cuda.get_device_capability(device_index)[0]
    return _MAJOR[device_index]


def has_pdl(device_index: int) -> bool:
    """Programmatic dependent launch (griddepcontrol) needs compute capability 9.0 (Hopper) or later."""
    return compute_major(device_index) >= 9


def pdl_launch(t: torch.Tensor) -> bool:
    """Launch a Triton kernel on ``t``'s device with programmatic dependent launch: a CUDA tensor on a GPU that has
    it (``has_pdl``), not under the interpreter."""
    return not INTERPRETED and t.is_cuda and has_pdl(t.device.index or 0)


_USABLE: dict[int, bool] = {}


def triton_usable(device_index: int) -> bool:
    """Triton importable and a CUDA GPU it can compile for (compute capability >= 8.0 for bf16 tensor cores);
    decided once per device (a dict lookup afterwards, which torch.compile traces as a constant)."""
    if device_index in _USABLE:
        return _USABLE[device_index]
    ok = True
    try:
        import triton  # noqa: F401
    except ImportError:
        warn_once("no-triton", "triton is not installed: packed layers on the GPU use the slower PyTorch path")
        ok = False
    if ok:
        major = compute_major(device_index)
        if major < 8:
            warn_once("old-gpu", f"GPU compute capability {major}.x < 8.0: packed layers use the PyTorch path")
            ok = False
    _USABLE[device_index] = ok
    return ok
