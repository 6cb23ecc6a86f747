"""The compile pass that makes a gated MLP's silu(gate) * up in the packed gate/up projection's kernel
(kernels/fusion.py): what it rewrites, what it must leave alone, and that the rewritten graph computes the same
thing (on the CPU, through the ops' PyTorch kernels; the GPU kernel's gated epilogue is checked in
tests/test_mma_kernel.py)."""
import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from binaryllm.export.bits import pack_signs
from binaryllm.kernels import mma_w1a16 as mw
from binaryllm.kernels import fusion, ops
from binaryllm.kernels.fusion import FusePackedLinear, _is, fuse_glu, fuse_outer
from binaryllm.kernels.triton_w1a16 import prepare_weight

D, I = 64, 96


def _layer(n, k, seed, pairs=0):
    g = torch.Generator().manual_seed(seed)
    bits = pack_signs(torch.randn(n, k, generator=g))
    return (prepare_weight(bits, k), (torch.rand(n, generator=g) + 0.5).half(), mw.prepare_tiles(bits, k, pairs))


# stacked [gate | up] with paired tiles, the down projection, its bias, an input scale
W = (*_layer(2 * I, D, 0, pairs=I), *_layer(D, I, 1), torch.randn(D).to(torch.bfloat16),
     (torch.rand(D) + 0.5).half())


def mlp_split(x, WGU, SGU, TGU, WD, SD, TD, BIAS, SIN):   # nn/fuse.py's stack, split as the HF Llama MLP sees it
    g, u = ops.w1a16(x, WGU, SGU, D, None, None, TGU, I).split([I, I], -1)
    return ops.w1a16(F.silu(g) * u, WD, SD, I, None, BIAS, TD)


def mlp_slices_up_first(x, WGU, SGU, TGU, WD, SD, TD, BIAS, SIN):   # sliced, the product the other way round
    gu = ops.w1a16(x, WGU, SGU, D, SIN, None, TGU, I)
    return gu[..., I:] * F.silu(gu[..., :I])


def mlp_swapped(x, WGU, SGU, TGU, WD, SD, TD, BIAS, SIN):           # [up | gate]: not the kernel's order
    gu = ops.w1a16(x, WGU, SGU, D, None, None, TGU, I)
    return F.silu(gu[..., I:]) * gu[..., :I]


def mlp_unpaired(x, WGU, SGU, TGU, WD, SD, TD, BIAS, SIN):          # tiles without pairs (or none at all)
    a = ops.w1a16(x, WGU, SGU, D, None, None, TGU, 0).split([I, I], -1)
    b = ops.w1a16(x, WGU, SGU, D, None, None, None, I).split([I, I], -1)
    return F.silu(a[0]) * a[1] + F.silu(b[0]) * b[1]


def mlp_other_use(x, WGU, SGU, TGU, WD, SD, TD, BIAS, SIN):         # gate/up read again: its kernel would stay
    gu = ops.w1a16(x, WGU, SGU, D, None, None, TGU, I)
    g, u = gu.split([I, I], -1)
    return F.silu(g) * u + gu[..., :I]


def mlp_separate(x, WGU, SGU, TGU, WD, SD, TD, BIAS, SIN):          # gate and up from two ops
    g = ops.w1a16(x, WGU[:I], SGU[:I], D, None, None, None)
    u = ops.w1a16(x, WGU[I:], SGU[I:], D, None, None, None)
    return F.silu(g) * u


X = torch.randn(1, 1, D).to(torch.bfloat16)
CASES = [(mlp_split, 1), (mlp_slices_up_first, 1), (mlp_swapped, 0), (mlp_unpaired, 0), (mlp_other_use, 0),
         (mlp_separate, 0)]


@pytest.mark.parametrize("f,expect", CASES)
def test_pass_on_aten_graphs(f, expect):
    """On the ATen graph (silu as aten.silu, slices or split): rewritten only where it should be, the plain op,
    the silu and the product gone with it, the same output."""
    gm = make_fx(f, tracing_mode="fake")(X, *W)
    n_plain = sum(n.target is torch.ops.binaryllm.w1a16.default for n in gm.graph.nodes)
    assert fuse_glu(gm.graph) == expect
    gm.graph.lint()
    gm.recompile()
    left = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert left.count(torch.ops.binaryllm.w1a16_gated.default) == expect
    assert left.count(torch.ops.binaryllm.w1a16.default) == n_plain - expect
    if expect:
        assert torch.ops.aten.silu.default not in left and torch.ops.aten.mul.Tensor not in left
    assert torch.equal(gm(X, *W), f(X, *W))


@pytest.mark.parametrize("f,expect", CASES[:3])
def test_pass_inside_torch_compile(f, expect):
    """Installed as inductor's post-grad pass (silu decomposed to fp32 there): the compiled function rewrites the
    same matches.  Rewritten, it gives the eager output exactly (the op rounds as eager does); left alone, inductor
    fuses silu and the product without rounding between them, so it is only close."""
    p = FusePackedLinear(norm=False)
    torch._dynamo.reset()
    y = torch.compile(f, options={"post_grad_custom_post_pass": p, "fx_graph_cache": False})(X, *W)
    assert p.rewrites == expect
    ref = f(X, *W)
    if expect:
        assert torch.equal(y, ref)
    else:
        assert torch.allclose(y.float(), ref.float(), rtol=2 ** -6, atol=2 ** -6 * ref.abs().max().item())


def test_gated_op_is_the_gating_of_the_plain_op():
    x = torch.randn(3, D).to(torch.bfloat16)
    y = ops.w1a16(x, W[0], W[1], D, W[-1], None, W[2], I)
    assert torch.equal(ops.w1a16_gated(x, W[0], W[1], D, W[-1], None, W[2], I), F.silu(y[:, :I]) * y[:, I:])


def test_paired_tiles_round_trip_and_compute_the_plain_output():
    """Paired tiles hold gate row j and up row j in one 16-row tile (rows g and 8 + g); unpacked, and through the
    kernel's arithmetic in PyTorch, they give the unpaired layer back."""
    g = torch.Generator().manual_seed(3)
    N, K = 2 * 24, 300
    bits = pack_signs(torch.randn(N, K, generator=g))
    tiles = mw.prepare_tiles(bits, K, pairs=24)
    assert not torch.equal(tiles, mw.prepare_tiles(bits, K))
    from binaryllm.export.bits import unpack_signs
    dense = unpack_signs(bits, K)
    assert torch.equal(mw.unpack_tiles(tiles, N, K, pairs=24), (dense > 0).to(torch.uint8))
    order = mw.pair_order(24)
    assert order[:16].tolist() == list(range(8)) + list(range(24, 32))
    x, scale = torch.randn(2, K, generator=g), torch.rand(N, generator=g) + 0.5
    ref = x @ dense.T * scale
    assert torch.allclose(mw.reference_tiles(x, tiles, scale, N, K, pairs=24), ref, atol=1e-4)
    with pytest.raises(ValueError, match="multiple of 8"):
        mw.prepare_tiles(bits[:40], K, pairs=20)


def test_decode_compile_options_install_the_pass():
    from binaryllm.decode import compile_options
    assert isinstance(compile_options()["post_grad_custom_post_pass"], FusePackedLinear)
    assert "post_grad_custom_post_pass" not in compile_options(glu=False, norm=False, rope=False)
    counts = compile_options(glu=False, norm=False)["post_grad_custom_post_pass"].counts
    assert counts == {"glu": 0, "norm": 0, "rope": 0, "outer": 0}


# ---- the residual add + RMSNorm between two packed layers (fuse_norm) ----

def _rms(h, w, eps=1e-5):            # transformers' LlamaRMSNorm.forward, written out
    v = h.float().pow(2).mean(-1, keepdim=True)
    return w * (h.float() * torch.rsqrt(v + eps)).to(h.dtype)


NW = (torch.rand(D, generator=torch.Generator().manual_seed(7)) + 0.5).to(torch.bfloat16)
O, Q, GU = _layer(D, D, 5), _layer(3 * D, D, 6), _layer(2 * I, D, 8, pairs=I)


def blk(a, r):                       # o projection, residual add, RMSNorm, fused q/k/v
    h = r + ops.w1a16(a, *O[:2], D, None, None, O[2])
    return ops.w1a16(_rms(h, NW), *Q[:2], D, None, None, Q[2]), h


def blk_gated(a, r):                 # ... then the gated gate/up (the gating pass makes it w1a16_gated first)
    h = ops.w1a16(a, *O[:2], D, None, None, O[2]) + r
    g, u = ops.w1a16(_rms(h, NW), *GU[:2], D, None, None, GU[2], I).split([I, I], -1)
    return F.silu(g) * u, h


def blk_two_readers(a, r):           # q and k as two packed layers reading one norm: one producer, two consumers
    h = r + ops.w1a16(a, *O[:2], D, None, None, O[2])
    x = _rms(h, NW)
    return ops.w1a16(x, Q[0][:D], Q[1][:D], D, None, None, Q[2]) + ops.w1a16(x, Q[0][D:2 * D], Q[1][D:2 * D], D,
                                                                             None, None, Q[2]), h


def blk_in_scale(a, r):              # the consumer has an input scale: left alone
    h = r + ops.w1a16(a, *O[:2], D, None, None, O[2])
    return ops.w1a16(_rms(h, NW), *Q[:2], D, W[-1], None, Q[2]), h


def blk_out_read(a, r):              # the producer's output is read elsewhere too: left alone
    o = ops.w1a16(a, *O[:2], D, None, None, O[2])
    h = r + o
    return ops.w1a16(_rms(h, NW), *Q[:2], D, None, None, Q[2]) + o.sum(), h


def blk_no_tiles(a, r):              # no mma tiles on the consumer: left alone
    h = r + ops.w1a16(a, *O[:2], D, None, None, O[2])
    return ops.w1a16(_rms(h, NW), *Q[:2], D, None, None, None), h


def blk_fp32_weight(a, r):           # a norm weight in another dtype (not the Llama-style rounding): left alone
    h = r + ops.w1a16(a, *O[:2], D, None, None, O[2])
    return ops.w1a16(_rms(h, NW.float()).to(h.dtype), *Q[:2], D, None, None, Q[2]), h


def blk_fp32_stream(a, r):           # an fp32 residual stream (h is not the kernel's dtype): left alone
    h = r.float() + ops.w1a16(a, *O[:2], D, None, None, O[2])
    return ops.w1a16(_rms(h, NW.float()).to(a.dtype), *Q[:2], D, None, None, Q[2]), h


A, R = torch.randn(1, 1, D).to(torch.bfloat16), (torch.randn(1, 1, D) * 4).to(torch.bfloat16)
NORM_CASES = [(blk, 2, 0), (blk_gated, 2, 1), (blk_two_readers, 3, 0), (blk_in_scale, 0, 0), (blk_out_read, 0, 0),
              (blk_no_tiles, 0, 0), (blk_fp32_weight, 0, 0), (blk_fp32_stream, 0, 0)]


def _compiled_with_pass(f, *args):
    """(the pass, the targets of the graph it left, f compiled with it and called on args)."""
    p = FusePackedLinear()
    seen = []
    torch._dynamo.reset()

    def spy(graph):
        p(graph)
        seen.extend(n.target for n in graph.nodes if n.op == "call_function")
    return p, seen, torch.compile(f, options={"post_grad_custom_post_pass": spy, "fx_graph_cache": False})(*args)


@pytest.mark.parametrize("f,expect,glu", NORM_CASES)
def test_norm_pass_inside_torch_compile(f, expect, glu):
    """Inside torch.compile (RMSNorm decomposed to prims there): the producer becomes w1a16_res and each consumer
    w1a16_norm, the add and the norm's ops gone; the output is the eager one up to the last bit of the normed x (the
    sum of squares in another order); h, the residual stream, is exact."""
    p, seen, (y, h) = _compiled_with_pass(f, A, R)
    assert p.counts == {"glu": glu, "norm": expect, "rope": 0, "outer": 0}
    b = torch.ops.binaryllm
    if expect:
        assert seen.count(b.w1a16_res.default) == 1 and seen.count(b.w1a16_norm.default) == expect - 1
        assert torch.ops.aten.rsqrt.default not in seen and torch.ops.aten.mean.dim not in seen
    else:
        assert b.w1a16_res.default not in seen and b.w1a16_norm.default not in seen
    y0, h0 = f(A, R)
    assert torch.equal(h, h0)
    assert torch.allclose(y.float(), y0.float(), rtol=2 ** -6, atol=2 ** -6 * y0.abs().max().item())


def test_norm_ops_are_the_unfused_arithmetic():
    """w1a16_res is residual + w1a16 and the partial sums of its squares; w1a16_norm is w1a16 (or w1a16_gated) of
    rms_norm from those partials (the CPU kernels; the GPU ones: tests/test_mma_kernel.py)."""
    a, r = torch.randn(2, D).to(torch.bfloat16), torch.randn(2, D).to(torch.bfloat16)
    h, part = ops.w1a16_res(a, *O[:2], D, None, None, O[2], r)
    assert torch.equal(h, r + ops.w1a16(a, *O[:2], D, None, None, O[2]))
    assert part.shape == (2, mw.res_parts(2, D, D)[0]) and torch.allclose(part.sum(-1), (h.float() ** 2).sum(-1))
    x = mw.rms_norm(h, part, NW, 1e-5)
    assert torch.equal(ops.w1a16_norm(h, part, NW, 1e-5, *Q[:2], D, None, Q[2], 0, False),
                       ops.w1a16(x, *Q[:2], D, None, None, Q[2]))
    assert torch.equal(ops.w1a16_norm(h, part, NW, 1e-5, *GU[:2], D, None, GU[2], I, True),
                       ops.w1a16_gated(x, *GU[:2], D, None, None, GU[2], I))


# ---- the rotary embedding and the cache writes into the decode attention (fuse_rope) ----

HQ, HKV, HD, CL = 4, 2, 16, 12          # query heads, KV heads, head size, cache length


def _rotate_half(x):                    # transformers' Llama rotate_half / apply_rotary_pos_emb, written out
    return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)


def _heads(t, n):
    return t.view(1, 1, n, HD).transpose(1, 2)


def attn_step(qkv, cos, sin, kc, vc, pos, mask):          # one token, as a Llama attention layer sees it
    q, k, v = qkv.split([HQ * HD, HKV * HD, HKV * HD], -1)
    q, k, v = _heads(q, HQ), _heads(k, HKV), _heads(v, HKV)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    kc.index_copy_(2, pos, k)
    vc.index_copy_(2, pos, v)
    return ops.decode_attention(q, kc, vc, mask, None)


def attn_step_cache_read_again(qkv, cos, sin, kc, vc, pos, mask):     # the cache also read by something else
    return attn_step(qkv, cos, sin, kc, vc, pos, mask).sum() + kc.sum()


def attn_step_other_rotation(qkv, cos, sin, kc, vc, pos, mask):       # not rotate-half (halves the other way)
    q, k, v = qkv.split([HQ * HD, HKV * HD, HKV * HD], -1)
    q, k, v = _heads(q, HQ), _heads(k, HKV), _heads(v, HKV)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q, k = q * cos - _rotate_half(q) * sin, k * cos - _rotate_half(k) * sin
    kc.index_copy_(2, pos, k)
    vc.index_copy_(2, pos, v)
    return ops.decode_attention(q, kc, vc, mask, None)


def attn_step_unroped_key(qkv, cos, sin, kc, vc, pos, mask):          # the key written without the rotation
    q, k, v = qkv.split([HQ * HD, HKV * HD, HKV * HD], -1)
    q, k, v = _heads(q, HQ), _heads(k, HKV), _heads(v, HKV)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q = q * cos + _rotate_half(q) * sin
    kc.index_copy_(2, pos, k)
    vc.index_copy_(2, pos, v)
    return ops.decode_attention(q, kc, vc, mask, None)


def _rope_inputs(dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(11)
    ang = torch.randn(1, 1, HD // 2, generator=g).repeat(1, 1, 2)
    return (torch.randn(1, 1, (HQ + 2 * HKV) * HD, generator=g).to(dtype), ang.cos().to(dtype), ang.sin().to(dtype),
            torch.randn(1, HKV, CL, HD, generator=g).to(dtype), torch.randn(1, HKV, CL, HD, generator=g).to(dtype),
            torch.tensor([5]), (torch.arange(CL) <= 5).view(1, 1, 1, CL))


@pytest.mark.parametrize("f,expect", [(attn_step, 1), (attn_step_cache_read_again, 0), (attn_step_other_rotation, 0),
                                      (attn_step_unroped_key, 0)])
def test_rope_pass_inside_torch_compile(f, expect):
    """Compiled with the pass: rewritten only where the query and the written key are the rotate-half rotary
    embedding and the caches are read by the attention alone; the output and both caches as in eager."""
    import torch._dynamo
    torch._dynamo.reset()
    p = FusePackedLinear(glu=False, norm=False, rope=True)
    args = _rope_inputs()
    eager_caches = [t.clone() for t in args[3:5]]
    y_eager = f(*args[:3], *eager_caches, *args[5:])
    caches = [t.clone() for t in args[3:5]]
    with torch.no_grad():
        y = torch.compile(f, options={"post_grad_custom_post_pass": p, "fx_graph_cache": False})(
            *args[:3], *caches, *args[5:])
    assert p.counts["rope"] == expect
    # the rotation in fp32, rounded once (as inductor computes it); eager rounds each product: a last-bit difference
    for got, want in zip(caches, eager_caches):
        assert torch.allclose(got.float(), want.float(), atol=2e-2, rtol=1e-2)
        assert torch.equal(got[:, :, :5], want[:, :, :5]) and torch.equal(got[:, :, 6:], want[:, :, 6:])
    assert torch.allclose(y.float(), y_eager.float(), atol=2e-2, rtol=2e-2)


def test_rope_pass_writes_what_the_unfused_compiled_step_writes():
    """Against the same function compiled without the pass, the caches are bit for bit the same (both make the
    rotation in fp32 and round once)."""
    import torch._dynamo
    outs = []
    for rope in (True, False):
        torch._dynamo.reset()
        args = _rope_inputs()
        p = FusePackedLinear(glu=False, norm=False, rope=rope)
        with torch.no_grad():
            y = torch.compile(attn_step, options={"post_grad_custom_post_pass": p, "fx_graph_cache": False})(*args)
        assert p.counts["rope"] == int(rope)
        outs.append((y, args[3], args[4]))
    assert torch.equal(outs[0][1], outs[1][1]) and torch.equal(outs[0][2], outs[1][2])
    assert torch.allclose(outs[0][0].float(), outs[1][0].float(), atol=1e-2, rtol=1e-2)


def test_rope_pass_leaves_a_cache_read_before_the_write_alone():
    """The kernel writes the cache where the attention was: a read of the cache before the write must keep the
    unfused graph (it would see the new row otherwise)."""
    import torch._dynamo

    def f(qkv, cos, sin, kc, vc, pos, mask):
        before = kc[:, :, 5].float().sum()
        return attn_step(qkv, cos, sin, kc, vc, pos, mask).float().sum() + before
    torch._dynamo.reset()
    p = FusePackedLinear(glu=False, norm=False, rope=True)
    args = _rope_inputs()
    want = f(*args[:3], *[t.clone() for t in args[3:5]], *args[5:])
    with torch.no_grad():
        got = torch.compile(f, options={"post_grad_custom_post_pass": p, "fx_graph_cache": False})(*args)
    assert p.counts["rope"] == 0
    assert torch.allclose(got, want, rtol=1e-2)


# ---- the rotary angles' one-column matmul as a product (fuse_outer) ----

def rotary_angles(inv_freq, pos):                  # transformers' rotary embedding: fp32 (B, D/2, 1) @ (B, 1, T)
    freqs = (inv_freq[None, :, None].float().expand(pos.shape[0], -1, 1) @ pos[:, None, :].float()).transpose(1, 2)
    emb = torch.cat((freqs, freqs), -1)
    return emb.cos().to(torch.bfloat16), emb.sin().to(torch.bfloat16)


def two_column_matmul(a, b):                       # (4, 2) @ (2, 3): a real sum, left alone
    return a @ b


@pytest.mark.parametrize("shape", [(1, 1), (2, 3)])
def test_outer_pass_makes_one_column_matmuls_a_product_bit_for_bit(shape):
    """On the aten graph (as inductor hands it over on CUDA, where the bmm stays a GEMM; on the CPU inductor
    already decomposes it): the one-column bmm becomes a product, and cos/sin are bit for bit the same; a matmul
    with a real sum is left alone."""
    inv = 1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64))
    pos = torch.arange(shape[0] * shape[1]).view(*shape) * 37 + 5
    gm = make_fx(rotary_angles)(inv, pos)
    assert sum(_is(n, torch.ops.aten.bmm.default) for n in gm.graph.nodes) == 1
    assert fuse_outer(gm.graph) == 1
    gm.recompile()
    assert not any(_is(n, torch.ops.aten.bmm.default) for n in gm.graph.nodes)
    assert all(torch.equal(a, b) for a, b in zip(gm(inv, pos), rotary_angles(inv, pos)))
    a, b = torch.randn(4, 2), torch.randn(2, 3)
    gm = make_fx(two_column_matmul)(a, b)
    assert fuse_outer(gm.graph) == 0


# ---- the final RMSNorm into the lm_head's one-row GEMV (fuse_norm with a dense_gemv consumer) ----

V = 80
HEAD = (torch.randn(V, D, generator=torch.Generator().manual_seed(9)) / D ** 0.5).to(torch.bfloat16)


def last_blk(a, r):                  # the last block's down projection, the final norm, a no-op slice, the lm_head
    h = r + ops.w1a16(a, *O[:2], D, None, None, O[2])
    return ops.dense_gemv(_rms(h, NW)[:, -1:, :], HEAD), h


def last_blk_plain_add(a, r):        # h is not a packed layer's output plus the residual: left alone
    h = r + a
    return ops.dense_gemv(_rms(h, NW), HEAD), h


# last_blk on two rows: its slice keeps one row of two, not the GEMV's whole input, so it is left alone
@pytest.mark.parametrize("f,expect,a", [(last_blk, 2, A), (last_blk, 0, torch.cat([A, A], 1)),
                                        (last_blk_plain_add, 0, A)], ids=["last_blk", "two_rows", "plain_add"])
def test_final_norm_into_the_lm_head_inside_torch_compile(f, expect, a, monkeypatch):
    """The lm_head's dense GEMV after the final RMSNorm: the last down projection becomes w1a16_res and the lm_head
    dense_gemv_norm (the norm's ops gone); the logits are the eager ones up to the last bit of the normed x."""
    monkeypatch.setattr(fusion, "LM_HEAD_NORM", True)           # the default; pinned, so the test says what it tests
    r = R.expand(*a.shape[:2], D).contiguous()
    p, seen, (y, h) = _compiled_with_pass(f, a, r)
    assert p.counts["norm"] == expect
    b = torch.ops.binaryllm
    assert seen.count(b.dense_gemv_norm.default) == (expect > 0) and seen.count(b.w1a16_res.default) == (expect > 0)
    if expect:
        assert b.dense_gemv.default not in seen and torch.ops.aten.rsqrt.default not in seen
    y0, h0 = f(a, r)
    assert torch.equal(h, h0) and y.shape == y0.shape
    assert torch.allclose(y.float(), y0.float(), rtol=2 ** -6, atol=2 ** -6 * y0.abs().max().item())


def test_dense_gemv_norm_op_is_the_gemv_of_the_norm():
    a, r = torch.randn(1, 1, D).to(torch.bfloat16), torch.randn(1, 1, D).to(torch.bfloat16)
    h, part = ops.w1a16_res(a, *O[:2], D, None, None, O[2], r)
    assert torch.equal(ops.dense_gemv_norm(h, part, NW, 1e-5, HEAD),
                       ops.dense_gemv(mw.rms_norm(h, part, NW, 1e-5), HEAD))
