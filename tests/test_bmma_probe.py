"""bench/bmma_probe.py's torch side: the weight and plane layouts it hands the binary tensor cores, checked on the
CPU by rebuilding every m16n8k256 from its fragments (``emulate``) and comparing with the exact integer product;
the GPU run compares the kernels' output with ``exact_reference`` bit for bit (docs/RESULTS.md)."""
import importlib.util
import os
import sys

import pytest
import torch

from binaryllm.export.bits import pack_signs, unpack_signs

_BENCH = os.path.join(os.path.dirname(__file__), "..", "bench")
sys.path.insert(0, _BENCH)                                    # its sibling nvrtc_util, as when run from bench/
_spec = importlib.util.spec_from_file_location("bmma_probe", os.path.join(_BENCH, "bmma_probe.py"))
bp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bp)                                  # imports only; main() is not run


def _x(K: int, g: torch.Generator) -> torch.Tensor:
    # spread over 2^-12 .. 2^4 with one outlier, so the planes see small, rounded and large values of both signs
    x = torch.randn(K, generator=g) * torch.logspace(-12, 4, K, base=2)[torch.randperm(K, generator=g)]
    x[K // 3] = -37.0
    return x.bfloat16()


@pytest.mark.parametrize("N,K,P", [(16, 256, 24), (40, 520, 24), (33, 1000, 16), (7, 8, 32), (64, 2048, 24)])
def test_fragments_give_the_exact_integer_product(N, K, P):
    g = torch.Generator().manual_seed(N * K + P)
    bits = pack_signs(torch.randn(N, K, generator=g))
    x = _x(K, g)
    q, sh = bp.quantize(x, P)
    assert q.abs().max() < 2 ** (P - 1) and q.abs().max() >= 2 ** (P - 2)      # the scale uses the top plane
    sb = bp.emulate(bp.layout(bits, K), bp.planes_ref(x, P), N, K, P)
    w = unpack_signs(bits, K, torch.float64)
    assert torch.equal((2 * sb - q.sum()).double(), w @ q.double())            # sum w q = 2 sum b q - sum q


def test_quantize_keeps_bf16_values_near_the_top_exact():
    x = torch.tensor([3.0, -1.5, 2 ** -10, 0.3, -2 ** -23, 0.0] + [0.0] * 2).bfloat16()
    q, sh = bp.quantize(x, 24)
    assert sh == 24 - 1 - 2                                    # max |x| = 3 < 2^2
    back = q.double() * 2.0 ** -sh
    assert torch.equal(back[:4], x[:4].double())               # within 2^-(P-9) of the largest: exact
    assert back[4] == 0 and back[5] == 0                       # 2^-23 < 2^-sh / 2 = 2^-22: rounds to 0


def test_exact_reference_is_the_dense_product_to_bf16_rounding():
    N, K = 48, 768
    g = torch.Generator().manual_seed(5)
    bits = pack_signs(torch.randn(N, K, generator=g))
    sc = (torch.rand(N, generator=g) + 0.5).half()
    x = torch.randn(K, generator=g).bfloat16()
    y = bp.exact_reference(x, bits, sc, K, 24)
    dense = (x.double() @ unpack_signs(bits, K, torch.float64).t()) * sc.double()
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.double(), dense, rtol=2 ** -8, atol=0)             # one bf16 rounding of the result


def test_source_states_its_sizes():
    src = bp.source(8192, 8192, 1, 8, 1)
    assert "#define N_ 8192" in src and "#define P_ 24" in src and "bmma_gemv" in src and "and.popc" in src
    with pytest.raises(AssertionError):
        bp.source(64, 100, 1, 1, 1)                            # K must be a multiple of 8 (16-byte x loads)
