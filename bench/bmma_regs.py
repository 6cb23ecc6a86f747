"""Registers and spills of the bmma kernels (``kernels/bmma_w1a16.py``) per product tile, from Triton's own ptxas
on a box without a GPU (sm_90a), and how many programs of each tile an H100 (132 SMs, 64K registers an SM) holds at
once: a product whose programs do not all fit runs in two waves, and its second wave's weights are not loaded
while the kernel before it runs.

    python bench/bmma_regs.py [NxK:gated:norm_parts:RT,W ...]
"""
import os
import subprocess
import sys
import tempfile

import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from conftest import sm90_ptx                               # noqa: E402
from test_bmma_kernel import PREP_SIG, PROD_SIG            # noqa: E402

from binaryllm.kernels import bmma_w1a16 as bw              # noqa: E402

DEFAULT = ["22016x4096:1:256:1,4", "22016x4096:1:256:1,2", "22016x4096:1:256:1,1", "22016x4096:1:256:2,2",
           "22016x4096:1:256:1,8", "12288x4096:0:256:1,4", "12288x4096:0:256:1,2"]
SMS, REGS = 132, 65536


def ptxas_regs(ptx: str) -> tuple[int, int]:
    """(registers a thread, spill store bytes) that ptxas -v reports for one kernel."""
    exe = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    err = subprocess.run([exe, "-v", "-arch=sm_90a", f.name, "-o", os.devnull], capture_output=True,
                         text=True).stderr
    os.unlink(f.name)
    regs = int(err.split("Used ")[1].split(" registers")[0])
    spill = int(err.split("bytes spill stores")[0].split(",")[-1])
    return regs, spill


def main() -> None:
    prep, bmma = bw._build()
    al = {(i,): [["tt.divisibility", 16]] for i in range(6)}
    for spec in sys.argv[1:] or DEFAULT:
        shape, gated, parts, cfg = spec.split(":")
        N, K = map(int, shape.split("x"))
        gated, cfg = bool(int(gated)), tuple(map(int, cfg.split(",")))
        pg, pm, grid, m = bw.launch_meta(N, K, pdl=True, pairs=N // 2 if gated else 0, gated=gated,
                                         norm_parts=int(parts), config=cfg)
        regs, spill = ptxas_regs(sm90_ptx(bmma, PROD_SIG | {k: "constexpr" for k in m}, m,
                                          {"num_warps": m["W"], "launch_pdl": True}, al))
        per_sm = min(32, REGS // (-(-regs // 8) * 8 * 32 * m["W"]), 64 // m["W"])
        print(f"{spec}: product {grid[0]} programs x {m['W']} warps, {regs} registers, {spill} B spilled, "
              f"{per_sm} a SM -> {'one wave' if per_sm * SMS >= grid[0] else 'two waves or more'}")
        regs, spill = ptxas_regs(sm90_ptx(prep, PREP_SIG | {k: "constexpr" for k in pm}, pm,
                                          {"num_warps": 2 * pm["CP"], "launch_pdl": True}, al))
        print(f"    prep {pg} programs, {regs} registers, {spill} B spilled")


if __name__ == "__main__":
    main()
