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


def triton_usable(device) -> bool:
    """Triton importable and a CUDA GPU it can compile for (compute capability >= 8.0 for bf16 tensor cores)."""
    import torch
    try:
        import triton  # noqa: F401
    except ImportError:
        warn_once("no-triton", "triton is not installed: packed layers on the GPU use the slower PyTorch path")
        return False
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        warn_once("old-gpu", f"GPU compute capability {major}.x < 8.0: packed layers use the PyTorch path")
        return False
    return True
