"""The ``mma`` decode kernel (kernels/mma_w1a16.py).  Gluon has no interpreter, so on the CPU: the tile layout
(round trips, where one bit lands), the kernel's register arithmetic replayed in PyTorch against the dense
reference, the kernel compiled for sm_90 by Triton's own compiler (layouts checked, SASS made), and the dispatch
and fallbacks.  On a CUDA machine the kernel itself runs against the dense reference (also in the bench)."""
import os
import subprocess
import sys

import pytest
import torch

import binaryllm as bl
from binaryllm.export import pack_signs, unpack_signs
from binaryllm.kernels import mma_w1a16 as mw
from conftest import sm90_ptx, tiny_model

SHAPES = [(1, 16, 256), (3, 40, 300), (16, 576, 576), (9, 33, 1000), (2, 192, 576), (1, 17, 64)]


def _dense(x, bits, scale, K, input_scale=None, bias=None):
    xs = x if input_scale is None else (x * input_scale.to(x.dtype))
    y = xs.float() @ unpack_signs(bits, K).t() * scale.float()
    return y if bias is None else y + bias.float()


@pytest.mark.parametrize("M,N,K", SHAPES)
def test_tiles_round_trip_and_replayed_kernel_matches_dense(M, N, K):
    g = torch.Generator().manual_seed(N * 7 + K)
    w = torch.randn(N, K, generator=g)
    bits = pack_signs(w)
    tiles = mw.prepare_tiles(bits, K)
    NT, KB = mw.tile_shape(N, K)
    assert tiles.dtype == torch.int32 and tiles.numel() == NT * KB * 32 * mw.KG
    assert torch.equal(mw.unpack_tiles(tiles, N, K).bool(), w > 0)
    x = torch.randn(M, K, generator=g).bfloat16()
    scale = (torch.rand(N, generator=g) + 0.5).half()
    got = mw.reference_tiles(x, tiles, scale, N, K)
    assert torch.allclose(got, _dense(x, bits, scale, K), rtol=1e-5, atol=1e-5 * K ** 0.5)


@pytest.mark.parametrize("n,k", [(0, 0), (5, 17), (8 + 3, 64 + 16 * 2 + 4 * 3 + 2 * 1 + 1), (31, 1023), (16, 256)])
def test_one_bit_lands_where_the_docstring_says(n, k):
    """Only weight (n, k) is +1: exactly one bit is set, at the word and position of the module docstring."""
    N, K = 32, 1024
    signs = -torch.ones(N, K)
    signs[n, k] = 1
    tiles = mw.prepare_tiles(pack_signs(signs), K)
    rt, h, g = n // 16, (n % 16) // 8, n % 8
    kb, kg, t, q = k // 256, (k % 256) // 64, (k % 64) // 16, k % 16
    c, hk, e = q // 4, (q // 2) % 2, q % 2
    KB = K // 256
    word = ((rt * KB + kb) * 32 + g * 4 + t) * 4 + kg
    bit = 8 * hk + 4 * h + c + 16 * e
    expect = torch.zeros_like(tiles)
    expect[word] = torch.tensor(1 << bit, dtype=torch.int64).to(torch.int32) if bit < 31 else -2 ** 31
    assert torch.equal(tiles, expect)


def test_packed_layer_makes_tiles_only_where_the_kernel_runs():
    model = bl.pack(bl.binarize(tiny_model("llama"), bl.BinaryConfig()))
    from binaryllm.nn.packed import PackedBinaryLinear, prepare_kernels
    layers = [m for m in model.modules() if isinstance(m, PackedBinaryLinear)]
    assert layers and all(m.tiles() is None for m in layers)      # CPU weights: no tile copy is made
    assert prepare_kernels(model) == 0


def test_auto_dispatch_uses_mma_when_tiles_are_given(monkeypatch):
    from binaryllm.kernels import triton_w1a16 as tw
    calls = []
    monkeypatch.setattr(mw, "usable", lambda i: True)
    monkeypatch.setattr(mw, "mma_matmul", lambda x, t, s, N, K, si, b, cfg=None, pairs=0, gated=False:
                        calls.append((x.shape, N, K)) or torch.zeros(*x.shape[:-1], N))
    bits = pack_signs(torch.randn(40, 96))
    words = tw.prepare_weight(bits, 96)
    tiles = mw.prepare_tiles(bits, 96)
    tw.w1a16_matmul(torch.randn(2, 3, 96), words, torch.ones(40).half(), 96, tiles=tiles)
    assert calls == [(torch.Size([2, 3, 96]), 40, 96)]
    # a failing kernel (another Triton's Gluon): one warning, then the tc/gemv choice (decode_mode) instead
    monkeypatch.setattr(mw, "mma_matmul", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("gluon changed")))

    class Chosen(Exception):
        pass

    def choose(M, N, K):
        raise Chosen(M)

    monkeypatch.setattr(tw, "decode_mode", choose)
    monkeypatch.setattr(mw, "_USABLE", {})
    import warnings
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with pytest.raises(Chosen):
            tw.w1a16_matmul(torch.randn(1, 96), words, torch.ones(40).half(), 96, tiles=tiles)
    assert any("mma decode kernel failed (RuntimeError: gluon changed)" in str(x.message) for x in w)
    assert mw._USABLE == {0: False}


def test_bad_kernel_settings_are_one_line_errors(monkeypatch):
    from binaryllm.errors import BinaryLLMError
    for bad in ("1,4", "1,3,4", "x,4,4", "1,4,16", "1,4,4,1,2", "1,4,4,1,1,2", "1,4,4,1,1,4,2", "1,4,4,0,1,4,1,0"):
        monkeypatch.setenv("BINARYLLM_MMA_CONFIG", bad)
        with pytest.raises(BinaryLLMError, match="BINARYLLM_MMA_CONFIG.*fix or unset it"):
            mw._env_config()
    monkeypatch.setenv("BINARYLLM_MMA_CONFIG", "2,4,2,1")
    assert mw._env_config() == (2, 4, 2, 1)
    monkeypatch.setenv("BINARYLLM_MMA_CONFIG", "2,4,2,1,0")
    assert mw._env_config() == (2, 4, 2, 1, 0)
    monkeypatch.setenv("BINARYLLM_MMA_CONFIG", "1,8,2,0,1,4")
    assert mw._env_config() == (1, 8, 2, 0, 1, 4)
    monkeypatch.setenv("BINARYLLM_MMA_CONFIG", "1,4,4,0,1,4,1")
    assert mw._env_config() == (1, 4, 4, 0, 1, 4, 1)
    r = subprocess.run([sys.executable, "-c", "import binaryllm.kernels.triton_w1a16"], capture_output=True,
                       text=True, env={**os.environ, "BINARYLLM_DECODE_MODE": "fast"})
    assert r.returncode != 0 and "BINARYLLM_DECODE_MODE='fast' is not one of auto, mma, gemv, tc" in r.stderr


# (N, K, M, RT, warps, CH, bf16, bias, PDL[, CHAINS[, XS]]): even and ragged shapes, both batch widths, both
# dtypes, with and without programmatic dependent launch, one or four accumulator chains a warp, one row read
# through shared memory or not
COMPILE_CASES = [(8192, 8192, 1, 1, 4, 4, True, False, 1), (4096, 11008, 16, 2, 4, 2, True, True, 0),
                 (576, 576, 3, 1, 8, 1, False, False, 1), (1000, 300, 9, 2, 8, 2, False, True, 0),
                 (4096, 4096, 1, 1, 4, 4, True, False, 0), (576, 576, 1, 1, 4, 2, True, False, 1, 4),
                 (4096, 11008, 1, 1, 4, 2, True, True, 1, 4), (100, 200, 9, 1, 1, 2, False, False, 0, 4),
                 (4096, 4096, 1, 1, 4, 4, True, False, 1, 4, 1), (4096, 11008, 1, 1, 4, 2, False, True, 1, 4, 1),
                 (1000, 600, 1, 2, 4, 2, True, False, 0, 1, 1), (8192, 8192, 1, 2, 4, 8, True, False, 1, 1, 1)]


def test_default_tiles_follow_the_measured_rules():
    """One k-group a warp and four chains for K <= 2048 at 1-8 rows; XS and four chains for one row of the
    matrices between, one chain otherwise; the large and 16-row tiles unchanged; explicit configs without a CHAINS
    field keep one chain."""
    assert mw.default_config(1, 960, 576) == (1, 4, 2, 0, 1, 4)
    assert mw.default_config(8, 576, 1536) == (1, 8, 2, 0, 1, 4)
    assert mw.default_config(1, 64, 200) == (1, 1, 2, 0, 1, 4)
    # one row of a matrix with K > 2048 below XS_MAX weights: x through shared memory, four chains, CH 2 past 16
    # k-groups; 2-8 rows and larger matrices keep the one-chain tile
    assert mw.default_config(1, 4096, 4096) == mw.MMA_CONFIG_1_XS == (1, 4, 4, 0, 1, 4, 1)
    assert mw.default_config(1, 12288, 4096) == (1, 4, 4, 0, 1, 4, 1)
    assert mw.default_config(1, 4096, 11008) == mw.MMA_CONFIG_1_XS_LONG == (1, 8, 2, 0, 1, 4, 1)
    # one row of a matrix from XS_MAX weights up to LARGE (8192^2): 32-row programs, a warp's K slice in one round
    # through shared memory, one chain; 2-8 rows keep the one-chain tile
    assert mw.default_config(1, 22016, 4096) == mw.default_config(1, 8192, 8192) == mw.MMA_CONFIG_1_MID \
        == (2, 4, 8, 0, 1, 1, 1)
    assert mw.default_config(4, 8192, 8192) == mw.MMA_CONFIG_1
    # the same range, plain kernels of one row only, loads its row scales after the tensor-core loop (EARLY bit 1
    # off); fused kernels (here the 7B gate/up), other sizes and more rows keep the early loads
    early = {shape: mw.launch_config(*shape, True, False)[1]["EARLY"]
             for shape in [(1, 8192, 8192), (1, 22016, 4096), (1, 16384, 16384), (1, 4096, 4096), (2, 8192, 8192)]}
    assert early == {(1, 8192, 8192): 0, (1, 22016, 4096): 0, (1, 16384, 16384): 3, (1, 4096, 4096): 3,
                     (2, 8192, 8192): 3}
    assert mw.launch_config(1, 22016, 4096, True, False, pairs=11008, gated=True, norm_parts=256)[1]["EARLY"] == 3
    # a large matrix read through the RMSNorm prologue (Llama-7B's gate/up) takes 32-row programs: one wave
    assert mw.default_config(1, 22016, 4096, norm=True) == mw.MMA_CONFIG_1_NORM == (2, 2, 8, 0, 1, 1, 1)
    assert mw.default_config(1, 12288, 4096, norm=True) == mw.MMA_CONFIG_1_NORM_XS == (1, 2, 8, 0, 1, 4, 1)
    assert mw.default_config(1, 3072, 576, norm=True) == mw.default_config(1, 3072, 576)   # one k-group a warp
    grid, meta = mw.launch_config(1, 22016, 4096, True, False, has_pdl=True, pairs=11008, gated=True,
                                  norm_parts=256)
    assert grid == (688,) and meta["RT"] == 2 and meta["XS"] == meta["NORM"] == 1 and meta["CHAINS"] == 1
    assert mw.launch_config(1, 22016, 4096, True, False, (1, 4, 4, 0, 1))[0] == (1376,)  # 16-row programs
    grid, meta = mw.launch_config(1, 8192, 8192, True, False)
    assert grid == (256,) and meta["CH"] == 8 and meta["XS"] == 1 and meta["EVEN"]       # one round a warp
    assert mw.default_config(2, 4096, 4096) == mw.MMA_CONFIG_1
    assert mw.launch_config(1, 4096, 4096, True, False)[1]["XS"] == 1
    # a gated gate/up kernel keeps PDL when small (SmolLM2's), not when large (Llama-7B's): the H100 decode steps
    assert mw.launch_config(1, 3072, 576, True, False, has_pdl=True, gated=True)[1]["PDL"]
    assert not mw.launch_config(1, 22016, 4096, True, False, has_pdl=True, gated=True)[1]["PDL"]
    assert mw.launch_config(1, 22016, 4096, True, False, has_pdl=True)[1]["PDL"]
    assert mw.launch_config(2, 4096, 4096, True, False, (1, 4, 4, 0, 1, 4, 1))[1]["XS"] == 0   # one row only
    assert mw.default_config(1, 16384, 16384) == mw.MMA_CONFIG_1_LARGE
    assert mw.default_config(9, 960, 576) == mw.MMA_CONFIG_16
    assert mw.launch_config(1, 960, 576, True, False)[1]["CHAINS"] == 4
    assert mw.launch_config(1, 960, 576, True, False, (1, 4, 4, 0, 1))[1]["CHAINS"] == 1


def _ptx(N, K, M, config, bf16=True, bias=False, pairs=0, gated=False, res=False, norm_parts=0):
    """(sm_90 PTX, constexpr arguments) of the kernel for M rows of an (N, K) matrix, compiled on this CPU box as
    it would be launched on a Hopper GPU (``launch_config`` with PDL available)."""
    dt = "*bf16" if bf16 else "*fp16"
    sig = {"x_ptr": dt, "w_ptr": "*i32", "s_ptr": "*fp16", "b_ptr": dt, "y_ptr": dt,
           "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_ym": "i32", "zero": "i32",
           "r_ptr": dt, "p_ptr": "*fp32", "nw_ptr": dt, "eps": "fp32", "stride_rm": "i32", "NP": "i32"}
    _, const = mw.launch_config(M, N, K, bf16, bias, config, has_pdl=True, pairs=pairs, gated=gated, res=res,
                                norm_parts=norm_parts)
    sig.update({k: "constexpr" for k in const})
    names = list(sig)
    # what Triton's launcher specializes at run time: 16-byte aligned pointers, multiples of 16
    ints = {"N": N, "K": K, "stride_xm": K, "stride_ym": N // 2 if gated else N, "stride_rm": N}   # contiguous
    aligned = ["x_ptr", "w_ptr", "s_ptr", "y_ptr", "r_ptr", "p_ptr", "nw_ptr"] + [n for n, v in ints.items()
                                                                                 if v % 16 == 0]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    options = {"num_warps": const["W"], "launch_pdl": const["PDL"], **mw.compile_options(M, const)}
    return sm90_ptx(mw._build(), sig, const, options, attrs), const


@pytest.mark.parametrize("case", COMPILE_CASES)
def test_kernel_compiles_for_hopper_with_trivial_operand_layouts(case):
    """Triton's compiler builds the kernel for sm_90 on this CPU box (no GPU needed): the operand layouts must
    convert without data movement (assert_trivial), and the SASS must hold the expected tensor-core ops and no
    local-memory spills."""
    N, K, M, rt, warps, ch, bf16, bias, pdl, *rest = case
    chains, xs = rest[:1], (rest[1:] or [0])[0]
    _, KB = mw.tile_shape(N, K)
    ptx, const = _ptx(N, K, M, (rt, warps, ch, 1, pdl, *rest), bf16, bias)
    assert const["PDL"] == bool(pdl) and const["CHAINS"] == (chains or [1])[0] and const["XS"] == xs
    assert not mw.launch_config(M, N, K, bf16, bias, (rt, warps, ch, 1, 1))[1]["PDL"]   # a GPU without PDL
    ch, kbl = const["CH"], -(-KB // warps)
    n_mma = ptx.count("mma.sync.aligned.m16n8k16.row.col.f32." + ("bf16.bf16" if bf16 else "f16.f16"))
    rounds = -(-kbl // ch)
    assert n_mma == rounds * ch * 16 * rt * (1 if M <= 8 else 2)      # one per 16 x 16 weights x 8 columns
    assert ptx.count("lop3.b32") >= rounds * ch * 16 * rt * 4          # the +-1 pairs made in registers
    assert "st.local" not in ptx and "ld.local" not in ptx
    # XS: x is copied into shared memory once, then every activation fragment is read from there; without it the
    # fragments come straight from global memory and only the epilogue's warp reduction uses shared memory
    n_lds = ptx.count("ld.shared")                  # 16-byte loads: 8 a k-group a thread, 8+ in the epilogue
    assert n_lds >= rounds * ch * 8 + 8 if xs else (M > 8 or n_lds <= 16 * rt)
    if pdl:
        # the first round's weight words (RT x CH 16-byte loads a thread) are loaded before the wait for the
        # previous kernel, and with EARLY the epilogue's row scales (and bias: a thread's rows g and 8 + g of each
        # row tile); the activations and the store only after it; then the next kernel may launch (a plain
        # kernel, TRIG 1: the fused ones of a decode step let it launch before their wait, TRIG 3, below)
        before, after = ptx.split("griddepcontrol.wait", 1)
        n_epi = 2 * rt * (1 + bias) if const["EARLY"] & 1 else 0
        assert before.count("ld.global.v4.b32") == rt * ch and before.count("ld.global") == rt * ch + n_epi
        assert const["TRIG"] == 1 and "st.global" not in before and "griddepcontrol.launch_dependents" in after
        assert after.count("ld.global") > 0 and "st.global" in after
    else:
        assert "griddepcontrol" not in ptx


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel itself needs a CUDA GPU (bench checks it too)")
@pytest.mark.parametrize("M,N,K", SHAPES + [(1, 4096, 4096), (16, 4096, 11008), (1, 8192, 8192)])
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
def test_kernel_on_the_gpu_matches_dense(M, N, K, dt):
    g = torch.Generator(device="cuda").manual_seed(N + K)
    bits = pack_signs(torch.randn(N, K, device="cuda", generator=g))
    tiles = mw.prepare_tiles(bits, K)
    x = torch.randn(M, K, device="cuda", generator=g).to(dt)
    scale = (torch.rand(N, device="cuda", generator=g) + 0.5).half()
    s_in = (torch.rand(K, device="cuda", generator=g) + 0.5).half()
    bias = torch.randn(N, device="cuda", generator=g).to(dt)
    for cfg in (None, (1, 8, 1, 1, 0), (1, 8, 1, 1, 1), (2, 4, 4, 0, 1), (1, 4, 2, 0, 1, 4), (2, 4, 4, 1, 1, 4),
                (1, 4, 4, 0, 1, 4, 1), (2, 4, 2, 1, 0, 1, 1), (1, 2, 8, 0, 1, 1, 1), (2, 4, 8, 0, 1, 1, 1)):
        y = mw.mma_matmul(x, tiles, scale, N, K, s_in, bias, cfg)
        ref = _dense(x, bits, scale, K, s_in, bias)
        assert torch.allclose(y.float(), ref, rtol=2 ** -7, atol=1e-4 * K ** 0.5 * ref.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel itself needs a CUDA GPU")
@pytest.mark.parametrize("pdl", [0, 1])
def test_chained_kernels_in_a_cuda_graph_see_each_others_output(pdl):
    """With programmatic dependent launch a kernel starts before the previous one ends; each must still read
    the previous output, not what its buffer held before: 12 square layers chained back to back in one CUDA
    graph (every other one also through a residual add), replayed on new inputs, against the same chain run
    eagerly with PDL off."""
    N = 2048
    g = torch.Generator(device="cuda").manual_seed(5)
    layers = []
    for _ in range(12):
        bits = pack_signs(torch.randn(N, N, device="cuda", generator=g))
        scale = ((torch.rand(N, device="cuda", generator=g) + 0.5) / N ** 0.5).half()
        layers.append((mw.prepare_tiles(bits, N), scale))
    cfg = (1, 4, 4, 1, pdl)

    def chain(x, c):
        for i, (t, s) in enumerate(layers):
            y = mw.mma_matmul(x, t, s, N, N, config=c)
            x = y + x if i % 2 else y
        return x
    x = torch.zeros(1, N, device="cuda", dtype=torch.bfloat16)
    chain(x, cfg)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = chain(x, cfg)
    for seed in range(3):
        x.copy_(torch.randn(1, N, device="cuda", generator=g))
        graph.replay()
        ref = chain(x.clone(), (1, 4, 4, 1, 0))
        torch.cuda.synchronize()
        assert torch.equal(y, ref), (seed, (y.float() - ref.float()).abs().max().item())



@pytest.mark.parametrize("N,K,M,config", [(22016, 4096, 1, None), (3072, 576, 1, None), (3072, 576, 5, None),
                                          (1024, 600, 12, (2, 4, 2, 1, 1, 1, 0))])
def test_gated_epilogue_compiles_without_moving_data(N, K, M, config):
    """Paired tiles (gate row j and up row j in the accumulator rows g and 8 + g of one thread): the gated epilogue
    makes silu(gate) * up with one exp a pair and no shared memory beyond the warps' reduction, and stores half
    as many outputs; the tensor-core work is the plain kernel's."""
    plain = _ptx(N, K, M, config)[0]
    paired = _ptx(N, K, M, config, pairs=N // 2)[0]
    gated = _ptx(N, K, M, config, pairs=N // 2, gated=True)[0]
    mma = "mma.sync.aligned.m16n8k16"
    assert gated.count(mma) == paired.count(mma) == plain.count(mma) > 0
    assert "ex2.approx" in gated and "ex2.approx" not in paired
    assert gated.count("st.shared") == plain.count("st.shared")        # the split along h is within registers
    assert "st.local" not in gated and "ld.local" not in gated
    assert 0 < gated.count("st.global") <= paired.count("st.global")


@pytest.mark.parametrize("N,K,M", [(4096, 4096, 1), (576, 1536, 1), (576, 576, 3)])
def test_residual_epilogue_compiles_to_one_add_and_partial_sums(N, K, M):
    """RES: the plain kernel's tensor-core work, then the residual loaded and added, and one more store (the
    program's partial sums of y^2 a row of x)."""
    plain, res = _ptx(N, K, M, None)[0], _ptx(N, K, M, None, res=True)[0]
    mma = "mma.sync.aligned.m16n8k16"
    assert res.count(mma) == plain.count(mma) > 0
    assert res.count("ld.global") > plain.count("ld.global") and res.count("st.global") > plain.count("st.global")
    assert "st.local" not in res and "ld.local" not in res


@pytest.mark.parametrize("N,K,pairs", [(12288, 4096, 0), (22016, 4096, 11008), (960, 576, 0), (3072, 576, 1536)])
def test_norm_prologue_compiles_with_the_weight_before_the_wait(N, K, pairs):
    """NORM (one row; it turns XS on): the norm weight is loaded before griddepcontrol.wait (it is a weight), the
    partial sums and x after it, one rsqrt a thread; the tensor-core work is the XS kernel's."""
    ptx, const = _ptx(N, K, 1, None, pairs=pairs, gated=bool(pairs), norm_parts=256)
    rt, w, ch, *rest = mw.default_config(1, N, K, norm=True)
    fence, pdl, chains = (list(rest) + [1, 1, 1][len(rest):])[:3]
    xs = _ptx(N, K, 1, (rt, w, ch, fence, pdl, chains, 1), pairs=pairs, gated=bool(pairs))[0]   # the same, no norm
    assert const["NORM"] == const["XS"] == 1 and const["NPP"] == 256
    mma = "mma.sync.aligned.m16n8k16"
    assert ptx.count(mma) == xs.count(mma) > 0
    assert "rsqrt.approx" in ptx and "rsqrt" not in xs
    assert "st.local" not in ptx and "ld.local" not in ptx
    if const["PDL"]:
        before = ptx.split("griddepcontrol.wait", 1)[0]
        assert before.count("ld.global") > xs.split("griddepcontrol.wait", 1)[0].count("ld.global")
    with pytest.raises(ValueError, match="one row"):
        mw.mma_matmul(torch.zeros(2, K, dtype=torch.bfloat16), torch.zeros(1, dtype=torch.int32),
                      torch.ones(N).half(), N, K, norm=(torch.zeros(2, 3), torch.ones(K), 1e-5))


@pytest.mark.parametrize("trig", [1, 2])
def test_large_gated_kernel_lets_the_next_launch_without_waiting_itself(monkeypatch, trig):
    """Llama-7B's gate/up (norm + gated, GATED_PDL_MAX weights or more) is launched without PDL, so it has no
    griddepcontrol.wait; it still lets the next kernel (the down projection) launch: at its start (GATED_TRIGGER 1,
    the default) or after its last tensor-core op (2); the smaller gated kernel (SmolLM2's) waits and triggers
    just before its wait, as every fused kernel (FUSED_TRIGGER 3), where a plain kernel triggers after it."""
    assert mw.GATED_TRIGGER == 1
    monkeypatch.setattr(mw, "GATED_TRIGGER", trig)
    big, const = _ptx(22016, 4096, 1, None, pairs=11008, gated=True, norm_parts=256)
    assert not const["PDL"] and const["TRIG"] == trig
    assert "griddepcontrol.wait" not in big
    trigger = big.index("griddepcontrol.launch_dependents")
    assert trigger > big.rindex("mma.sync") if trig == 2 else trigger < big.index("mma.sync")
    small, const = _ptx(3072, 576, 1, None, pairs=1536, gated=True, norm_parts=64)
    assert const["PDL"] and const["TRIG"] == 3
    wait, trigger = small.index("griddepcontrol.wait"), small.index("griddepcontrol.launch_dependents")
    assert trigger < wait < small.index("mma.sync")
    for kw in (dict(res=True), dict(norm_parts=256), {}):
        ptx, const = _ptx(4096, 4096, 1, None, **kw)
        wait, trigger = ptx.index("griddepcontrol.wait"), ptx.index("griddepcontrol.launch_dependents")
        assert const["TRIG"] == (3 if kw else 1) and (trigger < wait if kw else wait < trigger)


@pytest.mark.parametrize("pre", [0, 1, 2, 3])
def test_rounds_loaded_before_the_wait(monkeypatch, pre):
    """PRE_ROUNDS: how many rounds of a warp's weights are loaded before griddepcontrol.wait (the down projection of
    Llama-7B: 3 rounds of 2 k-groups a warp); each round is still loaded once, and 0 loads none before it."""
    monkeypatch.setattr(mw, "PRE_ROUNDS", pre)
    ptx, const = _ptx(4096, 11008, 1, None, res=True)
    assert const["PRE"] == pre and const["CH"] == 2
    before = ptx.split("griddepcontrol.wait", 1)[0]
    assert before.count("ld.global.v4.b32") == 2 * pre and ptx.count("ld.global.v4.b32") == 2 * 3 + 8


def test_partial_sums_and_norm_reference():
    """res_partials are sums of y^2 over each program's rows; rms_norm from them is transformers' RMSNorm."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    g = torch.Generator().manual_seed(0)
    y = (torch.randn(3, 100, generator=g) * 4).to(torch.bfloat16)
    part = mw.res_partials(y, 7, 16)
    assert part.shape == (3, 7) and part.dtype == torch.float32
    assert torch.allclose(part[:, 1], (y[:, 16:32].float() ** 2).sum(-1)) and torch.all(part[:, 6:] > 0)
    assert torch.allclose(part.sum(-1), (y.float() ** 2).sum(-1), rtol=1e-5)
    norm = LlamaRMSNorm(100, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(100, generator=g) + 0.5)
    out = mw.rms_norm(y, part, norm.weight, 1e-5)
    ref = norm(y)
    assert out.dtype == ref.dtype and (out != ref).float().mean() < 0.02      # the sum's order: a last bit at most
    assert torch.allclose(out.float(), ref.float(), rtol=2 ** -7)
    assert mw.res_parts(1, 100, 300) == (7, 16)


@pytest.mark.parametrize("N,K,mean", [(16, 256, 0.0), (40, 300, 3.0), (33, 1000, -20.0), (64, 2048, 0.5)])
def test_class_conversion_reference_matches_dense(N, K, mean):
    """The class conversion's arithmetic (CLASS_LOP on the shifted words, x doubled in classes 0 and 1, T off the
    end) gives the dense product, also where x has a large mean (T much larger than y) and K is ragged (padded
    columns hold x = 0 and count nothing in T)."""
    g = torch.Generator().manual_seed(N + K)
    bits = pack_signs(torch.randn(N, K, generator=g))
    tiles = mw.prepare_tiles(bits, K)
    x = (torch.randn(2, K, generator=g) + mean).bfloat16()
    scale = (torch.rand(N, generator=g) + 0.5).half()
    ref = _dense(x, bits, scale, K)
    got = mw.reference_tiles(x, tiles, scale, N, K, cls=True)
    tol = 1e-5 * K ** 0.5 * (1 + abs(mean))
    assert torch.allclose(got, ref, rtol=1e-5, atol=tol)
    assert torch.allclose(got, mw.reference_tiles(x, tiles, scale, N, K), rtol=1e-5, atol=tol)
    # the lop3 values themselves: 1 / 2^-32, 1 / 2^-64, 2 / 0, +1 / -1 for a set / clear bit of each class
    t = torch.tensor([0xF000F000, 0], dtype=torch.int64)
    assert [mw._class_values(t, c)[:, 0].tolist() for c in range(4)] == \
        [[1.0, 2.0 ** -32], [1.0, 2.0 ** -64], [2.0, 0.0], [1.0, -1.0]]


def test_class_conversion_compiles_to_one_lop3_a_register(monkeypatch):
    """CLASS_CONV: the plain one-row bf16 kernels read through XS by one chain (the MID default tile of 8192^2)
    shift each word four times instead of sixteen, with the same tensor-core ops and loads, no spills and no
    shared memory beyond the plain kernel's (T comes off each warp's own accumulator); fp16, more rows, four
    chains and the fused kernels keep the sign conversion."""
    monkeypatch.setattr(mw, "CLASS_T_LATE", False)
    monkeypatch.setattr(mw, "CLASS_CONV", 1)
    on, const = _ptx(8192, 8192, 1, None)
    assert const["CLS"] == 1 and const["CHAINS"] == 1 and const["XS"] == 1
    monkeypatch.setattr(mw, "CLASS_CONV", 0)
    off, const_off = _ptx(8192, 8192, 1, None)
    assert const_off["CLS"] == 0
    words = const["RT"] * const["CH"] * mw.KG                  # a thread's words (one round)
    assert off.count("shl.b32") >= 16 * words and on.count("shl.b32") <= 4 * words + off.count("shl.b32") - 16 * words
    for op in ("mma.sync", "lop3.b32", "ld.global.v4", "st.shared", "bar.sync"):
        assert on.count(op) == off.count(op), op
    assert on.count("mul.rn.bf16x2") > 0 and "ld.local" not in on and "st.local" not in on
    monkeypatch.setattr(mw, "CLASS_CONV", 1)
    cls = {i: mw.launch_config(*case[:3], case[3], False, case[4], **case[5])[1]["CLS"] for i, case in enumerate([
        (1, 22016, 4096, True, None, {}), (1, 8192, 8192, False, None, {}), (2, 8192, 8192, True, None, {}),
        (1, 4096, 4096, True, None, {}), (1, 4096, 4096, True, (1, 4, 4, 0, 1, 1, 1), {}),
        (1, 4096, 4096, True, (1, 4, 4, 0, 1, 1, 1), {"res": True}),
        (1, 22016, 4096, True, None, {"pairs": 11008, "gated": True, "norm_parts": 256}),
        (1, 12288, 4096, True, None, {"norm_parts": 256})])}
    assert list(cls.values()) == [1, 0, 0, 0, 1, 0, 0, 0]
    # bit 2: the fused kernels too (the residual epilogue, Llama-7B's gate/up), still one chain only (not q/k/v)
    monkeypatch.setattr(mw, "CLASS_CONV", 3)
    cls = [mw.launch_config(1, N, K, True, False, cfg, **kw)[1]["CLS"] for N, K, cfg, kw in [
        (4096, 4096, (1, 4, 4, 0, 1, 1, 1), {"res": True}),
        (22016, 4096, None, {"pairs": 11008, "gated": True, "norm_parts": 256}),
        (12288, 4096, None, {"norm_parts": 256})]]
    assert cls == [1, 1, 0]
    gated, const = _ptx(22016, 4096, 1, None, pairs=11008, gated=True, norm_parts=256)
    assert const["CLS"] == 1 and "ld.local" not in gated and gated.count("ex2.approx") > 0
    # CLASS_CHAINS4: four-chain kernels too (q/k/v), their warps' T added up apart from the accumulators
    monkeypatch.setattr(mw, "CLASS_CHAINS4", True)
    qkv, const = _ptx(12288, 4096, 1, None, norm_parts=256)
    assert const["CLS"] == 1 and const["CHAINS"] == 4 and "ld.local" not in qkv
    # CLASS_T_LATE: T from shared memory after the loop, one more pass over the warp's x there
    monkeypatch.setattr(mw, "CLASS_T_LATE", True)
    late, const = _ptx(8192, 8192, 1, None)
    assert const["CLS"] == 2 and late.count("ld.shared") > on.count("ld.shared") and "ld.local" not in late


CLASS_SHAPES = [(8192, 8192, 0.0), (22016, 4096, 2.0), (1000, 300, -5.0), (4096, 4096, 0.0)]


def class_case(N, K, mean):
    """One row of bf16 x with mean ``mean`` (T large) and random packed weights on the GPU: (x, tiles, scale, bias,
    the dense product, its atol).  Also used by bench/class_conv_err.py."""
    g = torch.Generator(device="cuda").manual_seed(N + K)
    bits = pack_signs(torch.randn(N, K, device="cuda", generator=g))
    tiles = mw.prepare_tiles(bits, K)
    x = (torch.randn(1, K, device="cuda", generator=g) + mean).to(torch.bfloat16)
    scale = (torch.rand(N, device="cuda", generator=g) + 0.5).half()
    bias = torch.randn(N, device="cuda", generator=g).to(torch.bfloat16)
    ref = _dense(x, bits, scale, K, None, bias)
    return x, tiles, scale, bias, ref, 1e-4 * K ** 0.5 * ref.abs().max().item()


CLASS_TILES = (None, (2, 4, 8, 0, 1, 1, 1), (1, 4, 4, 0, 1, 1, 1), (1, 2, 8, 0, 1, 1, 1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel itself needs a CUDA GPU")
@pytest.mark.parametrize("late", [False, True])
@pytest.mark.parametrize("N,K,mean", CLASS_SHAPES)
def test_class_conversion_on_the_gpu(monkeypatch, N, K, mean, late):
    """The class conversion against the sign conversion and the dense product, on the default tile and explicit
    one-chain XS tiles, with an activation mean that makes T large; T summed from x as loaded or (CLASS_T_LATE)
    from shared memory after the loop."""
    monkeypatch.setattr(mw, "CLASS_T_LATE", late)
    x, tiles, scale, bias, ref, tol = class_case(N, K, mean)
    for cfg in CLASS_TILES:
        ys = {}
        for on in (True, False):
            monkeypatch.setattr(mw, "CLASS_CONV", int(on))
            assert mw.launch_config(1, N, K, True, True, cfg)[1]["CLS"] == \
                int(bool(on and (cfg or N * K >= mw.XS_MAX))) * (1 + late)
            ys[on] = mw.mma_matmul(x, tiles, scale, N, K, None, bias, cfg).float()
            assert torch.allclose(ys[on], ref, rtol=2 ** -7, atol=tol), (cfg, on)
        assert torch.allclose(ys[True], ys[False], rtol=2 ** -7, atol=tol), cfg


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel itself needs a CUDA GPU")
@pytest.mark.parametrize("N,K,pairs", [(22016, 4096, 11008), (4096, 4096, 0), (1008, 300, 504)])
def test_class_conversion_in_fused_kernels_on_the_gpu(monkeypatch, N, K, pairs):
    """CLASS_CONV bit 2: the norm prologue with the gated epilogue (T of the normed x), and the residual epilogue,
    one chain and (CLASS_CHAINS4) four, against the same kernels with the sign conversion."""
    g = torch.Generator(device="cuda").manual_seed(N + K)
    bits = pack_signs(torch.randn(N, K, device="cuda", generator=g))
    tiles = mw.prepare_tiles(bits, K, pairs=pairs)
    h = (torch.randn(1, K, device="cuda", generator=g) * 20 + 3).to(torch.bfloat16)
    part = mw.res_partials(h, 37, 16 * (K // 256 + 1))
    nw = (torch.rand(K, device="cuda", generator=g) + 0.5).to(torch.bfloat16)
    scale = (torch.rand(N, device="cuda", generator=g) + 0.5).half()
    r = (torch.randn(1, N, device="cuda", generator=g) * 30).to(torch.bfloat16)
    kw = dict(pairs=pairs, gated=True, norm=(part, nw, 1e-5)) if pairs else dict(residual=r)
    monkeypatch.setattr(mw, "CLASS_CHAINS4", True)
    for cfg in (None if pairs else (1, 4, 4, 0, 1, 1, 1), (1, 4, 4, 0, 1, 4, 1)):      # one chain, four chains
        ys = {}
        for conv in (3, 1):
            monkeypatch.setattr(mw, "CLASS_CONV", conv)
            assert mw.launch_config(1, N, K, True, False, cfg, pairs=pairs, gated=bool(pairs), res=not pairs,
                                    norm_parts=37 if pairs else 0)[1]["CLS"] == (conv == 3) * (1 + mw.CLASS_T_LATE)
            y = mw.mma_matmul(h, tiles, scale, N, K, config=cfg, **kw)
            ys[conv] = (y if pairs else y[0]).float()
        tol = 2 ** -7 * K ** 0.5 * ys[1].abs().max().item() / 10
        assert torch.allclose(ys[3], ys[1], rtol=2 ** -6, atol=tol), cfg


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel itself needs a CUDA GPU")
@pytest.mark.parametrize("M,N,K", [(1, 4096, 4096), (1, 4096, 11008), (1, 576, 1536), (3, 576, 576), (1, 1000, 300)])
def test_residual_epilogue_on_the_gpu(M, N, K):
    """RES: y is the residual plus the plain kernel's output, bit for bit (the same sums, rounded as eager), and the
    partial sums are those of y^2 over each program's rows."""
    g = torch.Generator(device="cuda").manual_seed(N + K)
    bits = pack_signs(torch.randn(N, K, device="cuda", generator=g))
    tiles = mw.prepare_tiles(bits, K)
    x = torch.randn(M, K, device="cuda", generator=g).to(torch.bfloat16)
    r = (torch.randn(M, N, device="cuda", generator=g) * 30).to(torch.bfloat16)
    scale = (torch.rand(N, device="cuda", generator=g) + 0.5).half()
    for cfg in (None, (1, 4, 4, 0, 1, 4, 1), (2, 4, 2, 1, 0, 1, 0)):
        h, part = mw.mma_matmul(x, tiles, scale, N, K, config=cfg, residual=r)
        y = mw.mma_matmul(x, tiles, scale, N, K, config=cfg)
        assert torch.equal(h, r + y), cfg
        assert part.shape == (M, mw.res_parts(M, N, K, cfg)[0])
        assert torch.allclose(part, mw.res_partials(h, *mw.res_parts(M, N, K, cfg)), rtol=1e-5), cfg


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel itself needs a CUDA GPU")
@pytest.mark.parametrize("N,K,pairs", [(12288, 4096, 0), (22016, 4096, 11008), (4096, 4096, 0), (960, 576, 0),
                                       (3072, 576, 1536), (1000, 300, 0)])
def test_norm_prologue_on_the_gpu(N, K, pairs):
    """NORM: the kernel's output is the plain (or gated) kernel's on ``rms_norm`` of x, up to the last bit of the
    normed x (the partial sums' order, rsqrt.approx)."""
    g = torch.Generator(device="cuda").manual_seed(N + K)
    bits = pack_signs(torch.randn(N, K, device="cuda", generator=g))
    tiles = mw.prepare_tiles(bits, K, pairs=pairs)
    h = (torch.randn(1, K, device="cuda", generator=g) * 20).to(torch.bfloat16)
    part = mw.res_partials(h, 37, 16 * (K // 256 + 1))
    nw = (torch.rand(K, device="cuda", generator=g) + 0.5).to(torch.bfloat16)
    scale = (torch.rand(N, device="cuda", generator=g) + 0.5).half()
    for cfg in (None, (1, 4, 4, 0, 1, 4, 1), (1, 4, 2, 0, 0, 1, 1)):
        y = mw.mma_matmul(h, tiles, scale, N, K, config=cfg, pairs=pairs, gated=bool(pairs),
                          norm=(part, nw, 1e-5))
        ref = mw.mma_matmul(mw.rms_norm(h, part, nw, 1e-5), tiles, scale, N, K, config=cfg, pairs=pairs,
                            gated=bool(pairs))
        tol = 2 ** -7 * K ** 0.5 * (nw.float().max().item() * 3)
        assert y.shape == ref.shape and torch.allclose(y.float(), ref.float(), rtol=2 ** -6, atol=tol), cfg
        assert (y != ref).float().mean() < 0.5, cfg


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel itself needs a CUDA GPU")
@pytest.mark.parametrize("M,N,K", [(1, 22016, 4096), (1, 3072, 576), (3, 3072, 576), (16, 1024, 600), (1, 48, 300)])
def test_paired_and_gated_kernel_on_the_gpu(M, N, K):
    """Paired tiles give the plain output (stored back in weight-row order); gated gives silu(gate) * up of it,
    over the default tile, XS and register tiles, with bias and input scale."""
    from binaryllm.kernels import silu_mul
    P = N // 2
    g = torch.Generator(device="cuda").manual_seed(N + K)
    bits = pack_signs(torch.randn(N, K, device="cuda", generator=g))
    tiles = mw.prepare_tiles(bits, K, pairs=P)
    x = torch.randn(M, K, device="cuda", generator=g).to(torch.bfloat16)
    scale = (torch.rand(N, device="cuda", generator=g) + 0.5).half()
    s_in = (torch.rand(K, device="cuda", generator=g) + 0.5).half()
    bias = torch.randn(N, device="cuda", generator=g).to(torch.bfloat16)
    ref = _dense(x, bits, scale, K, s_in, bias)
    for cfg in (None, (1, 4, 4, 0, 1, 4, 1), (2, 4, 2, 1, 0, 1, 0), (1, 8, 1, 1, 1), (2, 4, 4, 0, 1, 4)):
        y = mw.mma_matmul(x, tiles, scale, N, K, s_in, bias, cfg, pairs=P)
        tol = 1e-4 * K ** 0.5 * ref.abs().max().item()
        assert torch.allclose(y.float(), ref, rtol=2 ** -7, atol=tol), cfg
        h = mw.mma_matmul(x, tiles, scale, N, K, s_in, bias, cfg, pairs=P, gated=True)
        # the rounding of eager PyTorch on y, up to the last bit of silu (the kernel's exp is ex2.approx)
        ref_h = silu_mul(y, P).float()
        assert h.shape == (M, P) and torch.allclose(h.float(), ref_h, rtol=2 ** -7, atol=1e-6), cfg


def test_bench_kernel_patches_still_apply():
    """bench/mma_hot.py and bench/mma_noconv.py time patched copies of the kernel source: each anchor must be in it
    exactly once, and the patched copy must import with the patches in place (the row tile folded to program 0's,
    no shl conversion), so that a change to the kernel breaks here rather than on the GPU."""
    import importlib.util
    root = os.path.join(os.path.dirname(__file__), "..", "bench")
    spec = importlib.util.spec_from_file_location("mma_hot_script", os.path.join(root, "mma_hot.py"))
    hot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hot)                               # imports only; main() is not run
    assert hot.SRC.count(hot.WOFF) == 1 and hot.SRC.count(hot.CONV) == 1
    both = hot.patched("test_hot_noconv", True, True)
    src = open(both.__file__).read()
    assert "(rt % RT) * KB" in src and "shl.b32" not in src and both.KG == mw.KG
    noconv = open(os.path.join(root, "mma_noconv.py")).read()
    assert 'patched("noconv", hot=False, noconv=True)' in noconv       # the same patch, from mma_hot.py
