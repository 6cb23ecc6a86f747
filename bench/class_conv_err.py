"""The mma kernel's error against the dense product with the class conversion of the sign bits (CLASS_CONV) on and
off, T summed from x as loaded (CLS 1) or from shared memory after the loop (CLASS_T_LATE, CLS 2), on the default
tile and three explicit one-chain XS tiles, for the shapes and activation means of
tests/test_mma_kernel.py::test_class_conversion_on_the_gpu: the numbers behind that test's pass.  CUDA only;
results in docs/RESULTS.md (twenty-ninth session).

    PYTHONPATH=src python bench/class_conv_err.py
"""
import torch

from binaryllm.export import pack_signs, unpack_signs
from binaryllm.kernels import mma_w1a16 as mw

TILES = (None, (2, 4, 8, 0, 1, 1, 1), (1, 4, 4, 0, 1, 1, 1), (1, 2, 8, 0, 1, 1, 1))
for N, K, mean in [(8192, 8192, 0.0), (22016, 4096, 2.0), (1000, 300, -5.0), (4096, 4096, 0.0)]:
    g = torch.Generator(device="cuda").manual_seed(N + K)
    bits = pack_signs(torch.randn(N, K, device="cuda", generator=g))
    tiles = mw.prepare_tiles(bits, K)
    x = (torch.randn(1, K, device="cuda", generator=g) + mean).to(torch.bfloat16)
    scale = (torch.rand(N, device="cuda", generator=g) + 0.5).half()
    bias = torch.randn(N, device="cuda", generator=g).to(torch.bfloat16)
    ref = x.float() @ unpack_signs(bits, K).t() * scale.float() + bias.float()
    tol = 1e-4 * K ** 0.5 * ref.abs().max().item()          # the test's atol (its rtol is 2^-7)
    for late in (False, True):
        mw.CLASS_T_LATE = late
        for cfg in TILES:
            row = []
            for on in (1, 0):
                mw.CLASS_CONV = on
                y = mw.mma_matmul(x, tiles, scale, N, K, None, bias, cfg).float()
                bad = ((y - ref).abs() - 2 ** -7 * ref.abs() > tol).sum().item()
                cls = mw.launch_config(1, N, K, True, True, cfg)[1].get("CLS")
                row.append(f"on={on} CLS={cls} max|err|={(y - ref).abs().max().item():.4g} outside={bad}")
            print(N, K, mean, "late" if late else "early", cfg, f"atol={tol:.3g}", " | ".join(row), flush=True)
