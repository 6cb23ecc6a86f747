"""kernels/bmma_w1a16.py: the planes and the A fragments it makes from the ``mma`` tiles, checked on the CPU by
rebuilding every m16n8k256 from its fragments (``emulate``) against the exact integer product; the kernels compiled
for sm_90 on this box (their tensor-core and load instructions); and, on a CUDA GPU, their output against
``reference`` bit for bit."""
import pytest
import torch

from binaryllm.export.bits import pack_signs, unpack_signs
from binaryllm.kernels import bmma_w1a16 as bw
from binaryllm.kernels import mma_w1a16 as mw


def _x(K: int, g: torch.Generator, device: str = "cpu") -> torch.Tensor:
    # spread over 2^-12 .. 2^4 with one outlier: small, rounded and large values of both signs
    x = torch.randn(K, generator=g) * torch.logspace(-12, 4, K, base=2)[torch.randperm(K, generator=g)]
    x[K // 3] = -37.0
    return x.bfloat16().to(device)


PREP_SIG = {"x_ptr": "*bf16", "pl_ptr": "*i32", "hdr_ptr": "*i64", "K": "i32", "nw_ptr": "*bf16", "p_ptr": "*fp32",
            "NP": "i32", "eps": "fp32"}
PROD_SIG = {"w_ptr": "*i32", "pl_ptr": "*i32", "hdr_ptr": "*i64", "s_ptr": "*fp16", "b_ptr": "*fp16", "y_ptr": "*bf16",
            "r_ptr": "*bf16", "p_ptr": "*fp32", "N": "i32", "zero": "i32", "x_ptr": "*bf16", "K": "i32"}


def _variant(monkeypatch, variant: int) -> None:
    """bmma_w1a16.set_variant(variant) for one test (monkeypatch puts the switches back)."""
    for name, bit in (("FENCE", 1), ("CHAIN", 2), ("ASM_CONV", 4), ("EARLY", 8), ("XFIRST", 16), ("NARROW", 32)):
        monkeypatch.setattr(bw, name, bool(variant & bit))


def test_plane_columns_is_a_permutation_of_a_k_group():
    col = bw.plane_columns()
    assert torch.equal(col.sort().values, torch.arange(256))
    # fragment inputs 0..3 of lane 0 are tile bits 0..3 of word 0: columns 0, 4, 8, 12 (c = 0..3)
    assert col[:4].tolist() == [0, 4, 8, 12]
    assert col[4] == 64                                        # bit 2 of pi picks word 1 (kg 1)


@pytest.mark.parametrize("N,K,P,pairs", [(16, 256, 24, 0), (40, 600, 24, 0), (33, 257, 32, 0), (64, 512, 16, 0),
                                         (48, 1000, 24, 24), (7, 8, 24, 0)])
def test_fragments_from_the_mma_tiles_give_the_exact_integer_product(N, K, P, pairs):
    g = torch.Generator().manual_seed(N * K + P)
    bits = pack_signs(torch.randn(N, K, generator=g))
    tiles = mw.prepare_tiles(bits, K, pairs)
    x = _x(K, g)
    q, sh = bw.quantize(x, P)
    assert q.abs().max() < 2 ** (P - 1) and q.abs().max() >= 2 ** (P - 2)      # the scale uses the top plane
    pl, hdr = bw.planes_ref(x, P)
    assert hdr[0] == sh and hdr[1:].sum() == q.sum()
    sb = bw.emulate(tiles, pl, N, K, P)[:N]                                    # tile-row order
    b01 = (unpack_signs(bits, K, torch.float64) + 1) / 2
    exact = (b01 @ q.double()).long()
    if pairs:
        exact = exact[mw.pair_order(pairs)]
    assert torch.equal(sb, exact)


def test_quantize_rounds_to_the_row_grid_and_keeps_values_near_the_top_exact():
    x = torch.tensor([3.0, -1.5, 2 ** -10, 0.3, -2 ** -23, 0.0, 2 ** -22 * 1.5, 0.0]).bfloat16()
    q, sh = bw.quantize(x, 24)
    assert sh == 24 - 1 - 2                                    # max |x| = 3 < 2^2
    back = q.double() * 2.0 ** -sh
    assert torch.equal(back[:4], x[:4].double())               # within 2^-(P-9) of the largest: exact
    assert back[4] == 0 and back[5] == 0                       # 2^-23 is half a step: ties to even, 0
    assert back[6] == 2 ** -21                                 # 1.5 steps: ties to even, 2 steps
    assert bw.row_shift(torch.zeros(8).bfloat16(), 24) == 127  # an all-zero row


def test_non_finite_rows_are_flagged_not_rounded():
    x = torch.randn(300).bfloat16()
    tiles = mw.prepare_tiles(pack_signs(torch.randn(20, 300)), 300)
    sc = torch.ones(20).half()
    for bad in (float("inf"), float("nan")):
        xb = x.clone()
        xb[7] = bad
        assert bw.row_shift(xb, 24) == -1024
        with pytest.raises(ValueError, match="finite"):
            bw.quantize(xb, 24)
        assert torch.isnan(bw.reference(xb, tiles, sc, 20, 300)).all()


def test_reference_is_the_dense_product_to_one_rounding():
    N, K = 48, 768
    g = torch.Generator().manual_seed(5)
    bits = pack_signs(torch.randn(N, K, generator=g))
    tiles = mw.prepare_tiles(bits, K)
    sc = (torch.rand(N, generator=g) + 0.5).half()
    bias = torch.randn(N, generator=g).bfloat16()
    x = torch.randn(K, generator=g).bfloat16()
    y = bw.reference(x, tiles, sc, N, K, bias)
    dense = (x.double() @ unpack_signs(bits, K, torch.float64).t()) * sc.double() + bias.double()
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.double(), dense, rtol=2 ** -8, atol=2 ** -12)


@pytest.mark.parametrize("variant", [0, 32, 33, 34, 36, 39, 56])
@pytest.mark.parametrize("N,K,P", [(8192, 8192, 24), (1000, 600, 16), (4096, 11008, 32)])
def test_kernels_compile_for_hopper_with_the_expected_instructions(N, K, P, variant, monkeypatch):
    """Triton's compiler builds both kernels for sm_90 on this CPU box: the product issues one m16n8k256 per
    (row tile, k-group, plane group) of a warp, loads each lane's tile words with one 16-byte load before the PDL
    wait, and spills nothing; the prep rounds with cvt.rni."""
    from conftest import sm90_ptx
    _variant(monkeypatch, variant)
    prep, bmma = bw._build()
    pg, pm, grid, m = bw.launch_meta(N, K, P, pdl=True)
    al = {(i,): [["tt.divisibility", 16]] for i in range(6)}
    sig = PROD_SIG | {k: "constexpr" for k in m}
    ptx = sm90_ptx(bmma, sig, m, {"num_warps": m["W"], "launch_pdl": True}, al)
    if variant == 32:          # the residual epilogue: a bf16 load a row scale loaded (same rows), a partial sum stored
        rptx = sm90_ptx(bmma, sig, {**m, "RES": True}, {"num_warps": m["W"], "launch_pdl": True}, al)
        assert "st.global.b32" in rptx and "st.global.b32" not in ptx
        assert rptx.count("ld.global.b16") == 2 * ptx.count("ld.global.b16")
    rt, w = bw.default_config(N, K)
    cpw = -(-m["KB"] // w)
    cpw = 1 << (cpw - 1).bit_length()                           # a tensor dimension: padded to a power of 2
    assert ptx.count("mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc") == rt * cpw * (P // 8)
    body = ptx[ptx.index(".entry"):]
    wait = body.index("griddepcontrol.wait")
    assert body[:wait].count("ld.global.v4.b32") == rt * cpw                  # the weights, before the wait
    assert "ld.global.nc" not in body[:wait]                    # ptxas would move the wait above .nc loads
    assert "st.local" not in ptx and "ld.local" not in ptx
    ptx = sm90_ptx(prep, PREP_SIG | {k: "constexpr" for k in pm}, pm, {"num_warps": 2 * pm["CP"], "launch_pdl": True},
                   al)
    assert ptx.count("cvt.rni.s32.f32") >= 32 and "griddepcontrol.wait" in ptx
    # EARLY: the product may launch before the prep waits; otherwise only after
    early = ptx.index("griddepcontrol.launch_dependents") < ptx.index("griddepcontrol.wait")
    assert early == bool(variant & 8)
    assert pg == (-(-m["KB"] // bw.PREP_CHUNKS), P // 8)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="planes"):
        bw.launch_meta(64, 256, 20)
    with pytest.raises(ValueError, match="one row"):
        bw.make_planes(torch.zeros(2, 256, dtype=torch.bfloat16), 256)
    with pytest.raises(ValueError, match="bf16 or fp16"):
        bw.make_planes(torch.zeros(256), 256)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernels themselves need a CUDA GPU (bench checks too)")
@pytest.mark.parametrize("variant", [0, 32, 33, 34, 36, 39, 56])
@pytest.mark.parametrize("N,K,P,pairs,bias", [(1000, 1000, 24, 0, False), (4000, 3000, 16, 0, True),
                                              (2048, 1536, 32, 1024, True), (8192, 8192, 24, 0, False)])
def test_gpu_output_is_the_reference_bit_for_bit(N, K, P, pairs, bias, variant, monkeypatch):
    _variant(monkeypatch, variant)
    g = torch.Generator(device="cuda").manual_seed(N + K)
    bits = pack_signs(torch.randn(N, K, device="cuda", generator=g))
    tiles = mw.prepare_tiles(bits, K, pairs)
    sc = (torch.rand(N, device="cuda", generator=g) + 0.5).half()
    b = torch.randn(N, device="cuda", generator=g).bfloat16() if bias else None
    x = _x(K, torch.Generator().manual_seed(K)).cuda()
    pl, hdr = bw.make_planes(x, K, P)
    rp, rh = bw.planes_ref(x, P)
    assert torch.equal(pl, rp) and torch.equal(hdr, rh)
    y = bw.bmma_matmul(x[None], tiles, sc, N, K, bias=b, pairs=pairs, planes=P)
    assert y.shape == (1, N)
    assert torch.equal(y[0], bw.reference(x, tiles, sc, N, K, b, pairs, P))
    for bad in (float("inf"), float("nan")):             # a non-finite x: no finite (wrong) output
        xb = x.clone()
        xb[K // 2] = bad
        assert not torch.isfinite(bw.bmma_matmul(xb[None], tiles, sc, N, K, bias=b, pairs=pairs, planes=P)).any()


def test_auto_dispatch_takes_only_the_shapes_measured_faster(monkeypatch):
    x = torch.zeros(1, 16384, dtype=torch.bfloat16)
    assert not bw.takes(x, 16384, 16384)                        # a CPU tensor
    monkeypatch.setattr(bw, "usable", lambda i: True)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert bw.takes(x, 16384, 16384)
    assert bw.takes(torch.zeros(11008, dtype=torch.bfloat16), 4096, 11008)     # Llama-7B's down projection
    for N, K in ((8192, 4096), (12288, 4096), (22016, 4096)):          # K = 4096 from 8192 rows up: bmma is faster
        assert bw.takes(torch.zeros(1, K, dtype=torch.bfloat16), N, K)
        assert not bw.takes(torch.zeros(1, K, dtype=torch.bfloat16), N, K, residual=True)     # not measured
    for N, K in ((8192, 8192), (4096, 4096), (1024, 10240), (6144, 6144)):    # mma is faster, or not measured
        assert not bw.takes(torch.zeros(1, K, dtype=torch.bfloat16), N, K)
    assert not bw.takes(torch.zeros(2, 16384, dtype=torch.bfloat16), 16384, 16384)    # two rows
    assert not bw.takes(x.float(), 16384, 16384)
    monkeypatch.setattr(bw, "AUTO", False)
    assert not bw.takes(x, 16384, 16384)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernels themselves need a CUDA GPU")
def test_packed_layer_auto_path_runs_bmma_on_a_large_row_and_mma_below():
    from binaryllm.kernels.triton_w1a16 import prepare_weight, w1a16_matmul
    for N, K in ((4096, 11008), (8192, 4096), (1024, 1024)):
        g = torch.Generator(device="cuda").manual_seed(N)
        bits = pack_signs(torch.randn(N, K, device="cuda", generator=g))
        tiles = mw.prepare_tiles(bits, K)
        sc = (torch.rand(N, device="cuda", generator=g) + 0.5).half()
        x = torch.randn(1, K, device="cuda", generator=g).bfloat16()
        y = w1a16_matmul(x, prepare_weight(bits, K), sc, K, tiles=tiles)
        if bw.takes(x, N, K):
            assert torch.equal(y[0], bw.reference(x[0], tiles, sc, N, K))
        else:
            assert torch.equal(y, mw.mma_matmul(x, tiles, sc, N, K))


def test_residual_dispatch_needs_the_same_partial_sums_as_mma(monkeypatch):
    """The compiled decode step traces w1a16_res with mma's (programs, rows) of partial sums: bmma takes a residual
    layer only where its own programs cover the same rows."""
    monkeypatch.setattr(bw, "usable", lambda i: True)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    x = torch.zeros(11008, dtype=torch.bfloat16)
    assert bw.res_parts(4096, 11008) == mw.res_parts(1, 4096, 11008) == (256, 16)
    assert bw.takes(x, 4096, 11008, residual=True)
    monkeypatch.setattr(bw, "CONFIG", (2, 8))                    # 32 rows a program: not mma's partial sums
    assert bw.res_parts(4096, 11008) == (128, 32)
    assert bw.takes(x, 4096, 11008) and not bw.takes(x, 4096, 11008, residual=True)
    with pytest.raises(ValueError, match="unpaired"):
        bw.bmma_product(None, None, torch.zeros(1), torch.zeros(1), 64, 256, torch.bfloat16, pairs=32,
                        residual=torch.zeros(64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernels themselves need a CUDA GPU")
@pytest.mark.parametrize("pearly", [False, True])
@pytest.mark.parametrize("N,K,bias", [(4096, 11008, False), (1000, 3000, True)])
def test_gpu_residual_epilogue_is_eager_add_and_partial_sums(N, K, bias, pearly, monkeypatch):
    """residual + y rounded as eager PyTorch rounds it, bit for bit, and the partial sums of its squares as
    ``res_partials`` makes them (fp32 sums in another order: close, not equal); through ``w1a16_res_matmul``
    on the Llama-7B down projection, which ``auto`` takes to bmma."""
    from binaryllm.kernels.triton_w1a16 import prepare_weight, w1a16_res_matmul
    monkeypatch.setattr(bw, "PEARLY_RES", pearly)
    g = torch.Generator(device="cuda").manual_seed(N + 3)
    bits = pack_signs(torch.randn(N, K, device="cuda", generator=g))
    tiles = mw.prepare_tiles(bits, K)
    sc = (torch.rand(N, device="cuda", generator=g) + 0.5).half()
    b = torch.randn(N, device="cuda", generator=g).bfloat16() if bias else None
    x = _x(K, torch.Generator().manual_seed(K)).cuda()
    r = (torch.randn(N, device="cuda", generator=g) * 4).bfloat16()
    h, part = bw.bmma_matmul(x[None], tiles, sc, N, K, bias=b, residual=r[None])
    want = r + bw.reference(x, tiles, sc, N, K, b)
    assert h.shape == (1, N) and torch.equal(h[0], want)
    ref = mw.res_partials(want[None], *bw.res_parts(N, K))
    assert part.shape == ref.shape and torch.allclose(part, ref, rtol=1e-5)
    if bw.takes(x, N, K, residual=True):
        h2, part2 = w1a16_res_matmul(x[None], prepare_weight(bits, K), sc, K, None, b, tiles, r[None])
        assert torch.equal(h2, h) and torch.equal(part2, part)


def test_prep_lets_a_residual_product_launch_early(monkeypatch):
    """EARLY_RES: the prep before a residual-epilogue product (the decode step's down projection) triggers the
    product's launch before it waits; a plain product's prep waits first (EARLY off)."""
    assert bw.EARLY_RES and bw.PEARLY_RES and not bw.EARLY           # the defaults
    monkeypatch.setattr(bw, "PEARLY_RES", False)
    assert not bw.launch_meta(4096, 11008, pdl=True, res=True)[3]["TRIG_EARLY"]
    assert bw.launch_meta(4096, 11008, pdl=True, res=True)[1]["EARLY"]
    assert not bw.launch_meta(4096, 11008, pdl=True)[1]["EARLY"]
    assert bw.launch_meta(4096, 11008, pdl=True, res=True)[3]["RES"]
    monkeypatch.setattr(bw, "EARLY_RES", False)
    assert not bw.launch_meta(4096, 11008, pdl=True, res=True)[1]["EARLY"]
    monkeypatch.setattr(bw, "PEARLY_RES", True)                  # the product's own trigger, residual only
    assert bw.launch_meta(4096, 11008, pdl=True, res=True)[3]["TRIG_EARLY"]
    assert not bw.launch_meta(4096, 11008, pdl=True)[3]["TRIG_EARLY"]


@pytest.mark.parametrize("N,K,NP", [(22016, 4096, 256), (3072, 576, 64), (12288, 4096, 3)])
def test_norm_prep_and_gated_product_compile_for_hopper(N, K, NP):
    """The decode step's fused layers: the prep with the RMSNorm (NORM) loads its norm weights before the PDL wait
    (weights: they stream in while the kernel before it runs), the partial sums and x after it, and lets the
    product launch before its wait (EARLY_NORM); the gated product (paired tiles) makes silu(gate) * up in
    registers (ex2) with the same BMMAs and no more stores than the plain one; neither spills."""
    from conftest import sm90_ptx
    prep, bmma = bw._build()
    al = {(i,): [["tt.divisibility", 16]] for i in range(6)}
    pg, pm, grid, m = bw.launch_meta(N, K, pdl=True, pairs=N // 2, gated=True, norm_parts=NP)
    assert pm["NORM"] and pm["EARLY"] and m["GATED"] and pm["NPP"] >= NP and (m["RT"], m["W"]) == bw.GATED_CONFIG
    ptx = sm90_ptx(prep, PREP_SIG | {k: "constexpr" for k in pm}, pm, {"num_warps": 2 * pm["CP"], "launch_pdl": True},
                   al)
    body = ptx[ptx.index(".entry"):]
    wait = body.index("griddepcontrol.wait")
    assert body.index("griddepcontrol.launch_dependents") < wait
    assert body[:wait].count("ld.global") >= 2 and "ld.global.nc" not in body[:wait]     # the norm weights
    assert "rsqrt.approx" in body[wait:] and "st.local" not in ptx
    plain = bw.launch_meta(N, K, pdl=True, pairs=N // 2, config=bw.GATED_CONFIG)[3]
    gptx = sm90_ptx(bmma, PROD_SIG | {k: "constexpr" for k in m}, m, {"num_warps": m["W"], "launch_pdl": True}, al)
    pptx = sm90_ptx(bmma, PROD_SIG | {k: "constexpr" for k in plain}, plain, {"num_warps": m["W"], "launch_pdl": True},
                    al)
    op = "mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc"
    assert gptx.count(op) == pptx.count(op) > 0
    assert "ex2.approx" in gptx and "ex2.approx" not in pptx
    assert 0 < gptx.count("st.global") <= pptx.count("st.global")
    assert "st.local" not in gptx and "ld.local" not in gptx


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernels themselves need a CUDA GPU")
@pytest.mark.parametrize("N,K,NP,bias", [(22016, 4096, 256, False), (3072, 576, 64, True), (2000, 1000, 3, False)])
def test_gpu_norm_prep_and_gated_product(N, K, NP, bias, monkeypatch):
    """The prep with the RMSNorm writes the planes of ``rms_norm`` bit for bit where the mean square is exact
    (partials summing to K (0.25 - eps): rstd = 2 whatever the order of the sums), and close to them for any
    partials; the gated product is ``silu_mul`` of the paired product (itself ``reference`` bit for bit) up to
    the last bit of silu (ex2.approx, as mma's); through ``w1a16_norm_matmul`` when ``auto`` takes it."""
    from binaryllm.kernels import silu_mul
    from binaryllm.kernels.triton_w1a16 import prepare_weight, w1a16_norm_matmul
    g = torch.Generator(device="cuda").manual_seed(N + K)
    bits = pack_signs(torch.randn(N, K, device="cuda", generator=g))
    tiles = mw.prepare_tiles(bits, K, N // 2)
    sc = (torch.rand(N, device="cuda", generator=g) + 0.5).half()
    b = torch.randn(N, device="cuda", generator=g).bfloat16() if bias else None
    h = (torch.randn(K, device="cuda", generator=g) * 3).bfloat16()
    nw = (torch.rand(K, device="cuda", generator=g) + 0.5).bfloat16()
    eps = 2.0 ** -4
    part = torch.full((1, NP), K * (0.25 - eps) / NP, device="cuda")
    assert part.sum() / K + eps == 0.25
    x = mw.rms_norm(h, part, nw, eps)
    pl, hdr = bw.make_planes(h, K, norm=(part, nw, eps))
    rp, rh = bw.planes_ref(x)
    assert torch.equal(pl, rp) and torch.equal(hdr, rh)
    y = bw.bmma_matmul(h[None], tiles, sc, N, K, bias=b, pairs=N // 2, norm=(part, nw, eps))
    ref = bw.reference(x, tiles, sc, N, K, b, N // 2)
    assert torch.equal(y[0], ref)
    hg = bw.bmma_matmul(h[None], tiles, sc, N, K, bias=b, pairs=N // 2, gated=True, norm=(part, nw, eps))
    want = silu_mul(ref, N // 2)
    assert hg.shape == (1, N // 2) and torch.allclose(hg[0].float(), want.float(), rtol=2 ** -7, atol=1e-6)
    assert (hg[0] == want).float().mean() > 0.99
    rnd = torch.rand(1, NP, device="cuda", generator=g) * (2 * K / NP)          # any partials: close
    yr = bw.bmma_matmul(h[None], tiles, sc, N, K, bias=b, pairs=N // 2, norm=(rnd, nw, eps))
    yx = bw.reference(mw.rms_norm(h, rnd, nw, eps), tiles, sc, N, K, b, N // 2)
    assert torch.allclose(yr[0].float(), yx.float(), rtol=2 ** -6, atol=0.05 * yx.float().abs().max().item())
    monkeypatch.setattr(bw, "AUTO_GATED", True)
    monkeypatch.setattr(bw, "AUTO_MIN", 1)
    out = w1a16_norm_matmul(h[None], part, nw, eps, prepare_weight(bits, K), sc, K, b, tiles, N // 2, True)
    assert torch.equal(out, hg)


def test_fused_layers_dispatch_under_their_switches(monkeypatch):
    """``auto`` hands a gated (gate/up) layer to bmma only under AUTO_GATED and a plain layer behind a norm (q/k/v)
    only under AUTO_NORM, whatever their K, with the norm and gating passed on; never a norm with an input scale."""
    from binaryllm.kernels import triton_w1a16 as tw
    monkeypatch.setattr(bw, "usable", lambda i: True)
    monkeypatch.setattr(mw, "usable", lambda i: True)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    x = torch.zeros(1, 4096, dtype=torch.bfloat16)
    for flag, kw in (("AUTO_GATED", dict(gated=True)), ("AUTO_NORM", dict(norm=True))):
        monkeypatch.setattr(bw, flag, False)
        assert not bw.takes(x, 22016, 4096, **kw)
        monkeypatch.setattr(bw, flag, True)
        assert bw.takes(x, 22016, 4096, **kw) and not bw.takes(x, 1024, 1024, **kw)      # AUTO_MIN still holds
        assert not bw.takes(x, 22016, 4096, residual=True, **kw)
    seen = []
    monkeypatch.setattr(bw, "bmma_matmul", lambda *a, **k: seen.append(("bmma", k)) or "b")
    monkeypatch.setattr(mw, "mma_matmul", lambda *a, **k: seen.append(("mma", k)) or "m")
    norm = (torch.zeros(1, 4), torch.ones(4096), 1e-5)
    assert tw._auto_mma(x, x, x, 22016, 4096, None, None, 11008, gated=True, norm=norm) == "b"
    assert seen[-1][1]["gated"] and seen[-1][1]["norm"] is norm and seen[-1][1]["pairs"] == 11008
    assert tw._auto_mma(x, x, x, 12288, 4096, None, None, 0, norm=norm) == "b" and not seen[-1][1]["gated"]
    assert tw._auto_mma(x, x, x, 12288, 4096, torch.ones(4096), None, 0, norm=norm) == "m"     # an input scale
    assert tw._auto_mma(x, x, x, 12288, 4096, None, None, 0) == "b"                            # plain, K 4096
    x6 = torch.zeros(1, 6144, dtype=torch.bfloat16)
    assert tw._auto_mma(x6, x6, x6, 6144, 6144, None, None, 0) == "m"                         # plain, K 6144
    monkeypatch.setattr(bw, "AUTO_K_ALSO", ())
    assert tw._auto_mma(x, x, x, 12288, 4096, None, None, 0) == "m"


@pytest.mark.parametrize("K,P", [(256, 24), (1000, 16), (8192, 24), (3000, 32)])
def test_the_one_kernel_forms_bit_transpose_makes_the_prep_planes(K, P):
    """``transpose_words`` (the five stages the one-kernel form runs in registers) on each run of 32 inputs in
    fragment order gives the plane words that ``planes_ref`` (the prep) lays out, word for word."""
    x = _x(K, torch.Generator().manual_seed(K + P))
    q, _ = bw.quantize(x, P)
    KB = -(-K // 256)
    qp = torch.zeros(KB * 256, dtype=torch.int64)
    qp[:K] = q
    runs = qp.view(KB, 256)[:, bw.plane_columns()].view(KB, 2, 4, 32)          # [c, z, t, pi]
    words = bw.transpose_words(runs)[..., :P]                                  # [c, z, t, j]
    assert torch.equal(bw.transpose_words(words.new_tensor([[1 << i for i in range(32)]])),
                       words.new_tensor([[1 << i for i in range(32)]]))         # the identity is its own transpose
    w = words.view(KB, 2, 4, P // 8, 8).permute(0, 3, 4, 2, 1).reshape(-1)    # [c, h, g, t, z], as the prep's
    assert torch.equal(torch.where(w >= 2 ** 31, w - 2 ** 32, w).to(torch.int32), bw.planes_ref(x, P)[0])


def test_fused_config_keeps_a_program_an_sm_in_registers():
    assert bw.fused_config(8192, 8192) == (4, 8)             # 128 programs of 64 rows
    assert bw.fused_config(4096, 4096) == (2, 8)
    for N, K in ((11008, 4096), (4096, 11008), (22016, 4096), (16384, 16384), (960, 576)):
        rt, w = bw.fused_config(N, K)
        cpwp = 1 << (-(-tile_kb(N, K) // w) - 1).bit_length()
        assert rt & (rt - 1) == 0 and 4 * rt * cpwp <= 64


def tile_kb(N, K):
    return mw.tile_shape(N, K)[1]


@pytest.mark.parametrize("N,K,P", [(8192, 8192, 24), (1000, 600, 16), (4096, 11008, 32)])
def test_one_kernel_form_compiles_for_hopper(N, K, P):
    """The one-kernel form (FUSED) on this CPU box for sm_90: the tile words with one 16-byte load each before the
    PDL wait, x read after it (16-byte loads), rounded with cvt.rni, one m16n8k256 per (row tile, k-group, plane
    group) of a warp, and no local memory."""
    from conftest import sm90_ptx
    _, bmma = bw._build()
    _, _, grid, m = bw.launch_meta(N, K, P, config=bw.fused_config(N, K), pdl=True, fused=True)
    al = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 5, 10)}
    ptx = sm90_ptx(bmma, PROD_SIG | {k: "constexpr" for k in m}, m, {"num_warps": m["W"], "launch_pdl": True}, al)
    rt, w = bw.fused_config(N, K)
    cpwp = 1 << (-(-m["KB"] // w) - 1).bit_length()
    assert ptx.count("mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc") == rt * cpwp * (P // 8)
    body = ptx[ptx.index(".entry"):]
    wait = body.index("griddepcontrol.wait")
    assert body[:wait].count("ld.global.v4.b32") == rt * cpwp and "ld.global.nc" not in body[:wait]
    assert "cvt.rni.s32.f32" in body[wait:] and "cvt.rni.s32.f32" not in body[:wait]
    assert "st.local" not in ptx and "ld.local" not in ptx
    assert grid == (-(-mw.tile_shape(N, K)[0] // rt),)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernels themselves need a CUDA GPU (bench checks too)")
@pytest.mark.parametrize("N,K,P,pairs,bias,config", [
    (1000, 1000, 24, 0, False, None), (4000, 3000, 16, 0, True, None), (2048, 1536, 32, 1024, True, None),
    (8192, 8192, 24, 0, False, None), (8192, 8192, 24, 0, True, (2, 8)), (8192, 8192, 16, 0, False, (4, 16)),
    (4096, 11008, 24, 0, False, None), (960, 576, 24, 0, False, (1, 4))])
def test_gpu_one_kernel_form_is_the_reference_bit_for_bit(N, K, P, pairs, bias, config):
    """The one-kernel form (the product's programs make x's planes themselves) gives ``reference`` bit for bit, as
    the prep + product pair does; a non-finite x gives no finite output; with the residual epilogue residual + y
    and partial sums over its own programs' rows."""
    g = torch.Generator(device="cuda").manual_seed(N + K + 1)
    bits = pack_signs(torch.randn(N, K, device="cuda", generator=g))
    tiles = mw.prepare_tiles(bits, K, pairs)
    sc = (torch.rand(N, device="cuda", generator=g) + 0.5).half()
    b = torch.randn(N, device="cuda", generator=g).bfloat16() if bias else None
    x = _x(K, torch.Generator().manual_seed(K)).cuda()
    want = bw.reference(x, tiles, sc, N, K, b, pairs, P)
    y = bw.bmma_matmul(x[None], tiles, sc, N, K, bias=b, pairs=pairs, planes=P, config=config, fused=True)
    assert y.shape == (1, N) and torch.equal(y[0], want)
    for bad in (float("inf"), float("nan")):
        xb = x.clone()
        xb[K // 2] = bad
        yb = bw.bmma_matmul(xb[None], tiles, sc, N, K, bias=b, pairs=pairs, planes=P, config=config, fused=True)
        assert not torch.isfinite(yb).any()
    if not pairs:
        r = (torch.randn(N, device="cuda", generator=g) * 4).bfloat16()
        h, part = bw.bmma_matmul(x[None], tiles, sc, N, K, bias=b, planes=P, config=config, fused=True,
                                 residual=r[None])
        assert torch.equal(h[0], r + want)
        progs, rows = bw.res_parts(N, K, config or bw.fused_config(N, K))
        ref = mw.res_partials((r + want)[None], progs, rows)
        assert part.shape == ref.shape and torch.allclose(part, ref, rtol=1e-5)
    else:
        hg = bw.bmma_matmul(x[None], tiles, sc, N, K, bias=b, pairs=pairs, planes=P, config=config, fused=True,
                            gated=True)
        assert torch.equal(hg, bw.bmma_matmul(x[None], tiles, sc, N, K, bias=b, pairs=pairs, planes=P,
                                              gated=True, fused=False))


def test_timeline_stamps_sit_around_the_pdl_wait_and_after_the_last_store():
    """STAMP (``bench/bmma_timeline.py``): the prep and the product read clock64 and globaltimer before the PDL
    wait, after it and after their last store, and write them (with the SM) by atomic max into p_ptr."""
    from conftest import sm90_ptx
    prep, bmma = bw._build()
    pg, pm, grid, m = bw.launch_meta(8192, 8192, pdl=True)
    al = {(i,): [["tt.divisibility", 16]] for i in range(6)}
    for kern, sig, meta, warps in ((bmma, PROD_SIG, m, m["W"]), (prep, PREP_SIG, pm, 2 * pm["CP"])):
        meta = dict(meta, STAMP=True)
        ptx = sm90_ptx(kern, sig | {"p_ptr": "*i64"} | {k: "constexpr" for k in meta}, meta,
                       {"num_warps": warps, "launch_pdl": True}, al)
        body = ptx[ptx.index(".entry"):]
        clocks = [i for i in range(len(body)) if body.startswith("%clock64", i)]
        assert len(clocks) == 3 and "%smid" in body and body.count("atom.global") >= 7
        assert clocks[0] < body.index("griddepcontrol.wait") < clocks[1]
        last_store = max(body.rfind("st.global.b16"), body.rfind("st.global.v"), body.rfind("st.global.b32"),
                         body.rfind("st.global.b64"))
        assert clocks[1] < last_store < clocks[2]
