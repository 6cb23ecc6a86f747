"""The mma kernel's error against the dense product with the class conversion of the sign bits (CLASS_CONV) on and
off, T summed from x as loaded (CLS 1) or from shared memory after the loop (CLASS_T_LATE, CLS 2), on the default
tile and three explicit one-chain XS tiles, on the cases of tests/test_mma_kernel.py::test_class_conversion_on_the_gpu
(``class_case``): the numbers behind that test's pass.  CUDA only;
results in docs/RESULTS.md (twenty-ninth session).

    PYTHONPATH=src python bench/class_conv_err.py
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    sys.exit("bench/class_conv_err.py: the mma kernel needs a CUDA GPU; run it on a GPU machine")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from binaryllm.kernels import mma_w1a16 as mw  # noqa: E402
from test_mma_kernel import CLASS_SHAPES, CLASS_TILES, class_case  # noqa: E402

for N, K, mean in CLASS_SHAPES:
    x, tiles, scale, bias, ref, tol = class_case(N, K, mean)      # tol: the test's atol (its rtol is 2^-7)
    for late in (False, True):
        mw.CLASS_T_LATE = late
        for cfg in CLASS_TILES:
            row = []
            for on in (1, 0):
                mw.CLASS_CONV = on
                y = mw.mma_matmul(x, tiles, scale, N, K, None, bias, cfg).float()
                bad = ((y - ref).abs() - 2 ** -7 * ref.abs() > tol).sum().item()
                cls = mw.launch_config(1, N, K, True, True, cfg)[1].get("CLS")
                row.append(f"on={on} CLS={cls} max|err|={(y - ref).abs().max().item():.4g} outside={bad}")
            print(N, K, mean, "late" if late else "early", cfg, f"atol={tol:.3g}", " | ".join(row), flush=True)
