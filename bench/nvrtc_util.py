"""What bench/lut_probe.py and bench/bmma_probe.py share: CUDA C helpers for their NVRTC sources, and a launcher
through the driver's ``cuLaunchKernelEx`` (``torch.cuda._compile_kernel``'s own launcher has no launch attributes,
so no programmatic dependent launch)."""
import ctypes
import functools

import torch

HELPERS = r"""
#ifndef NC
#define NC 0
#endif

__device__ __forceinline__ float bf(unsigned h) { return __uint_as_float(h << 16); }

// not ld.global.nc (unless NC): ptxas moves griddepcontrol.wait (SASS ACQBULK) above .nc loads, so the weights would
// not stream in while the previous kernel finishes; it keeps the wait below plain loads, as Triton emits them
__device__ __forceinline__ uint4 ldw(const uint4* p) {
  uint4 v;
#if NC
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
#else
  asm volatile("ld.global.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
#endif
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}
"""


class _Attr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint), ("pad", ctypes.c_uint), ("value", ctypes.c_uint * 16)]


class _Config(ctypes.Structure):
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("smem", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_Attr)), ("nattrs", ctypes.c_uint)]


@functools.cache
def _driver():
    return torch.cuda._utils._get_gpu_runtime_library()


def launch(func, grid: int, block: int, smem: int, args, pdl: bool = True) -> None:
    """Launch an NVRTC-compiled kernel on the current stream through ``cuLaunchKernelEx``, with programmatic
    dependent launch allowed (attribute 6) when ``pdl``.  ``args``: tensors (passed as device pointers) and ctypes
    scalars, in the kernel's order."""
    ptrs = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else a for a in args]
    argv = (ctypes.c_void_p * len(ptrs))(*[ctypes.cast(ctypes.byref(p), ctypes.c_void_p) for p in ptrs])
    attr = _Attr(6, 0)
    attr.value[0] = 1
    cfg = _Config((grid, 1, 1), (block, 1, 1), smem, torch.cuda.current_stream().cuda_stream,
                  ctypes.pointer(attr), 1 if pdl else 0)
    rc = _driver().cuLaunchKernelEx(ctypes.byref(cfg), func, argv, None)
    if rc:
        raise RuntimeError(f"cuLaunchKernelEx: {rc}")
