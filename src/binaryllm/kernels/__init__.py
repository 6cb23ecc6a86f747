"""Fast paths for packed 1-bit layers: a Triton W1A16 kernel for CUDA (``triton_w1a16``) and a small C
lookup-table kernel for the CPU (``cpu``).  ``PackedBinaryLinear`` picks one per call and falls back to the
PyTorch reference path (unpack, dense matmul) with one warning where neither applies."""
from __future__ import annotations

import warnings

_WARNED: set[str] = set()


def warn_once(key: str, msg: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"binaryllm: {msg}", stacklevel=3)


_USABLE: dict[int, bool] = {}


def triton_usable(device_index: int) -> bool:
    """Triton importable and a CUDA GPU it can compile for (compute capability >= 8.0 for bf16 tensor cores);
    decided once per device (a dict lookup afterwards, which torch.compile traces as a constant)."""
    if device_index in _USABLE:
        return _USABLE[device_index]
    import torch
    ok = True
    try:
        import triton  # noqa: F401
    except ImportError:
        warn_once("no-triton", "triton is not installed: packed layers on the GPU use the slower PyTorch path")
        ok = False
    if ok:
        major, _ = torch.cuda.get_device_capability(device_index)
        if major < 8:
            warn_once("old-gpu", f"GPU compute capability {major}.x < 8.0: packed layers use the PyTorch path")
            ok = False
    _USABLE[device_index] = ok
    return ok
