"""The dense one-row GEMV (kernels/dense.py) for the output embeddings: the kernel under Triton's interpreter
(a child process with TRITON_INTERPRET=1, CPU tensors) against an fp32 reference, the switch of a model's lm_head
(``use_dense_gemv``) and its fallbacks, and on a CUDA GPU the kernel against cuBLAS and the compiled decode step
with and without it."""
import os
import subprocess
import sys

import pytest
import torch

from binaryllm.decode import StaticDecoder
from conftest import gpu_packed_model, sm90_ptx, tiny_model

_CHILD = r"""
import sys, torch
from binaryllm.kernels import dense
cases = torch.load(sys.argv[1])
torch.save([dense.gemv(c["x"], c["w"], c["tile"], c.get("norm")) for c in cases], sys.argv[2])
"""

# (N, K, tile or None (the default), dtype): rows and columns that are not multiples of the tile, one chunk and
# many.  fp16 only: the interpreter rounds fp32 to bf16 towards zero (1.0230 -> 1.0156), the GPU to nearest; the
# GPU tests below take bf16
CASES = [(37, 100, None, torch.float16), (64, 576, (4, 1024, 4), torch.float16), (20, 1030, (8, 256, 4), torch.float16),
         (33, 600, (16, 64, 4), torch.float16), (5, 4096, (4, 4096, 8), torch.float16)]


def _case(N, K, tile, dt):
    g = torch.Generator().manual_seed(N * 7 + K)
    return {"x": torch.randn(1, 1, K, generator=g).to(dt), "w": (torch.randn(N, K, generator=g) / K ** 0.5).to(dt),
            "tile": tile}


# with the final RMSNorm made as the kernel reads x (``norm``): (N, K, tile, partial sums)
NORM_CASES = [(37, 100, None, 3), (20, 1030, (8, 256, 4), 64), (5, 4096, (4, 4096, 8), 128)]


def _norm_case(N, K, tile, parts):
    from binaryllm.kernels.mma_w1a16 import res_partials
    c = _case(N, K, tile, torch.float16)
    g = torch.Generator().manual_seed(K)
    c["x"] = (c["x"].float() * 3).half()
    c["norm"] = (res_partials(c["x"], parts, -(-K // parts)), (torch.rand(K, generator=g) + 0.5).half(), 1e-5)
    return c


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    d = tmp_path_factory.mktemp("gemv")
    cases = [_case(*c) for c in CASES] + [_norm_case(*c) for c in NORM_CASES]
    torch.save(cases, d / "in.pt")
    r = subprocess.run([sys.executable, "-c", _CHILD, str(d / "in.pt"), str(d / "out.pt")],
                       env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return cases, torch.load(d / "out.pt")


@pytest.mark.parametrize("i", range(len(CASES)))
def test_kernel_matches_the_fp32_product_rounded_once(interpreted, i):
    cases, outs = interpreted
    c, y = cases[i], outs[i]
    N, K = c["w"].shape
    assert y.shape == (1, 1, N) and y.dtype == c["x"].dtype
    ref = c["x"].float() @ c["w"].float().T                  # exact products, fp32 sums
    # one rounding to x's dtype (the sums' order differs from the reference: fp32 rounding, far below that)
    assert ((y.float() - ref).abs() <= ref.abs() * 2 ** -11 + 1e-6 * K ** 0.5).all()


@pytest.mark.parametrize("i", range(len(NORM_CASES)))
def test_kernel_with_the_norm_is_the_product_of_the_normed_row(interpreted, i):
    """norm: x is h, and the kernel multiplies RMSNorm(h) * weight, its mean square from the partial sums, rounded
    as transformers' RMSNorm rounds it (x * rstd to x's dtype, then the weight's product); the rsqrt may differ in
    its last bit, which moves a normed element by at most one unit in its last place."""
    from binaryllm.kernels.mma_w1a16 import rms_norm
    cases, outs = interpreted
    c, y = cases[len(CASES) + i], outs[len(CASES) + i]
    N, K = c["w"].shape
    xn = rms_norm(c["x"], *c["norm"]).float()
    ref = xn @ c["w"].float().T
    slack = (xn.abs() * 2 ** -10) @ c["w"].float().abs().T           # one ulp of fp16 on every normed element
    assert y.shape == (1, 1, N) and ((y.float() - ref).abs() <= ref.abs() * 2 ** -11 + slack + 1e-6).all()
    assert not torch.equal(y, c["x"].new_zeros(y.shape))
    plain = c["x"].float() @ c["w"].float().T                        # the norm did something
    assert (y.float() - plain).abs().max() > 10 * (y.float() - ref).abs().max()


def test_gemv_rejects_what_it_does_not_take():
    from binaryllm.kernels import dense
    w = torch.zeros(4, 8, dtype=torch.float16)
    column_major = torch.zeros(8, 4, dtype=torch.float16).t()          # (4, 8), stride (1, 4)
    for x, ww in ((torch.zeros(2, 8, dtype=torch.float16), w), (torch.zeros(1, 8, dtype=torch.bfloat16), w),
                  (torch.zeros(1, 8, dtype=torch.float16), column_major)):
        with pytest.raises(ValueError, match="one row"):
            dense.gemv(x, ww)


def test_switching_the_lm_head_keeps_its_parameters_and_falls_back_off_the_gpu():
    from binaryllm.kernels.dense import DenseGEMVLinear, use_dense_gemv
    model = tiny_model("llama").eval()
    head = model.get_output_embeddings()
    w, sd = head.weight, {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(3, 96, (1, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, ref1 = model(input_ids=ids).logits, model(input_ids=ids[:, :1]).logits
        assert use_dense_gemv(model) is True and type(head) is DenseGEMVLinear
        assert use_dense_gemv(model) is True                           # twice: still once
        assert model.get_output_embeddings() is head and head.weight is w
        out = model(input_ids=ids).logits                              # CPU: nn.Linear's path, the same numbers
        one = model(input_ids=ids[:, :1]).logits
    assert torch.equal(out, ref) and torch.equal(one, ref1)
    assert model.state_dict().keys() == sd.keys() and all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    assert use_dense_gemv(model, False) is False and type(head) is torch.nn.Linear
    assert use_dense_gemv(torch.nn.Linear(2, 2)) is False              # no output embeddings: left alone


def test_tied_output_embeddings_stay_tied():
    from binaryllm.kernels.dense import use_dense_gemv
    cfg = tiny_model("llama").config
    cfg.tie_word_embeddings = True
    import transformers as tf
    model = tf.LlamaForCausalLM(cfg)
    assert use_dense_gemv(model)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_the_op_falls_back_to_linear_off_the_gpu():
    from binaryllm.kernels import ops
    x, w = torch.randn(1, 1, 16), torch.randn(8, 16)
    assert torch.equal(ops.dense_gemv(x, w), torch.nn.functional.linear(x, w))


def test_static_decoder_on_the_cpu_leaves_the_lm_head_alone():
    model = tiny_model("llama")
    dec = StaticDecoder(model, max_len=16, graph=False)
    assert dec.gemv is False and type(model.get_output_embeddings()) is torch.nn.Linear


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel runs on a CUDA GPU")
@pytest.mark.parametrize("N,K", [(32000, 4096), (49152, 576), (1000, 130)])
def test_gpu_kernel_matches_cublas(N, K):
    from binaryllm.kernels import dense
    g = torch.Generator("cuda").manual_seed(N)
    w = (torch.randn(N, K, device="cuda", generator=g) / K ** 0.5).bfloat16()
    x = torch.randn(1, K, device="cuda", generator=g).bfloat16()
    ref = x.float() @ w.float().T
    y = dense.gemv(x, w)
    assert ((y.float() - ref).abs() <= ref.abs() * 2 ** -8 + 1e-5 * K ** 0.5).all()
    assert (y.float() - torch.nn.functional.linear(x, w).float()).abs().max() <= ref.abs().max() * 2 ** -7


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel runs on a CUDA GPU")
@pytest.mark.parametrize("lm_head_norm", [False, True])
def test_compiled_gpu_step_with_the_gemv_gives_the_tokens_of_cublas(lm_head_norm, monkeypatch):
    """The compiled CUDA-graph step with the lm_head through the GEMV (with ``lm_head_norm`` the final RMSNorm made
    inside it, fusion.LM_HEAD_NORM) and through cuBLAS: the same greedy tokens, logits equal up to one rounding of
    bf16."""
    import torch._dynamo
    from binaryllm.kernels import fusion
    from binaryllm.kernels.dense import use_dense_gemv
    monkeypatch.setattr(fusion, "LM_HEAD_NORM", lm_head_norm)
    model = gpu_packed_model("llama")
    ids = torch.randint(3, 96, (1, 6), device="cuda", generator=torch.Generator("cuda").manual_seed(5))
    outs = []
    for on in (True, False):
        torch._dynamo.reset()
        dec = StaticDecoder(model, max_len=40, compile=True, gemv=on)
        assert dec.gemv is on and use_dense_gemv(model, on) is on
        outs.append((dec.generate(ids, 24), dec.out.float().clone()))
    assert torch.equal(outs[0][0], outs[1][0])
    assert (outs[0][1] - outs[1][1]).abs().max() <= outs[1][1].abs().max() * 2 ** -7


def test_a_kernel_that_fails_falls_back_to_linear_once_with_a_warning(monkeypatch):
    """If the Triton GEMV cannot build or run on a device, the lm_head goes through ``linear`` from then on (the
    same numbers), with one warning, instead of the step crashing."""
    import warnings

    from binaryllm import kernels
    from binaryllm.kernels import dense

    def broken(x, w, tile=None):
        raise RuntimeError("no kernel for this GPU")
    monkeypatch.setattr(dense, "gemv", broken)
    monkeypatch.setattr(dense, "_FAILED", set())
    monkeypatch.setattr(kernels, "_WARNED", set())
    x, w = torch.randn(1, 16), torch.randn(8, 16)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        y = dense.gemv_or_linear(x, w)
        assert torch.equal(y, torch.nn.functional.linear(x, w))
        assert torch.equal(dense.gemv_or_linear(x, w), y)
    assert sum("Triton GEMV of the lm_head failed" in str(r.message) for r in rec) == 1
    assert dense._FAILED == {0}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel runs on a CUDA GPU")
@pytest.mark.parametrize("N,K", [(32000, 4096), (49152, 576)])
def test_gpu_kernel_with_the_norm_matches_the_normed_product(N, K):
    from binaryllm.kernels import dense
    from binaryllm.kernels.mma_w1a16 import res_partials, rms_norm
    g = torch.Generator("cuda").manual_seed(N)
    w = (torch.randn(N, K, device="cuda", generator=g) / K ** 0.5).bfloat16()
    h = (torch.randn(1, K, device="cuda", generator=g) * 3).bfloat16()
    norm = (res_partials(h, 36, -(-K // 36)), (torch.rand(K, device="cuda", generator=g) + 0.5).bfloat16(), 1e-5)
    xn = rms_norm(h, *norm).float()
    ref = xn @ w.float().T
    y = dense.gemv(h, w, norm=norm)
    slack = (xn.abs() * 2 ** -7) @ w.float().abs().T                   # one bf16 ulp on every normed element
    assert ((y.float() - ref).abs() <= ref.abs() * 2 ** -8 + slack + 1e-5).all()


def _gemv_ptx(norm: bool, tile=(4, 1024, 4), K=4096) -> str:
    """sm_90 PTX of the GEMV for Llama-7B's lm_head (K 4096, bf16), compiled on this CPU box as it is launched on a
    Hopper GPU (PDL on)."""
    from binaryllm.kernels import dense
    bn, bk, warps = tile
    const = dict(K=K, BN=bn, BK=bk, PDL=True, NORM=norm, NPP=256)
    sig = {n: "constexpr" if n in const else "*fp32" if n == "p_ptr" else "*bf16" if n.endswith("_ptr") else
           "fp32" if n == "eps" else "i32" for n in dense._gemv_kernel.arg_names}
    return sm90_ptx(dense._gemv_kernel, sig, const, {"num_warps": warps})


def test_kernel_with_the_norm_builds_for_hopper_and_waits_before_reading_the_partials():
    """What the interpreter does not check: with the norm the kernel builds for sm_90 without spills; the first
    chunk of weights is still loaded before griddepcontrol.wait, and h, the norm weight and the partial sums (all
    written or read after the kernel before it) only after it."""
    plain, normed = _gemv_ptx(False), _gemv_ptx(True)
    for ptx in (plain, normed):
        assert "ld.local" not in ptx and "st.local" not in ptx and ptx.count("griddepcontrol.wait") == 1
    (p_before, p_after), (n_before, n_after) = (ptx.split("griddepcontrol.wait", 1) for ptx in (plain, normed))
    assert n_before.count("ld.global") == p_before.count("ld.global") > 0      # the weights' first chunk only
    assert n_after.count("ld.global") > p_after.count("ld.global")             # + partials and the norm weight
    assert "sqrt" in normed and "sqrt" not in plain
