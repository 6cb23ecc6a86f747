"""The compile pass that moves a gated MLP's silu(gate) * up into the packed down projection (kernels/fusion.py):
what it rewrites, what it must leave alone, and that the rewritten graph computes the same thing (on the CPU,
through the ops' PyTorch kernels; the GPU kernel's GLU input is checked in tests/test_mma_kernel.py)."""
import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from binaryllm.export.bits import pack_signs
from binaryllm.kernels import ops
from binaryllm.kernels.fusion import GluIntoPackedLinear, fuse_glu
from binaryllm.kernels.triton_w1a16 import prepare_weight

D, I = 64, 96


def _layer(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    return prepare_weight(pack_signs(torch.randn(n, k, generator=g)), k), (torch.rand(n, generator=g) + 0.5).half()


W = (*_layer(2 * I, D, 0), *_layer(D, I, 1), torch.randn(D).to(torch.bfloat16), torch.full((I,), 0.5).half())
WD, SD, BIAS = W[2:5]


def mlp_split(x, WGU, SGU, WD, SD, BIAS, SIN):            # nn/fuse.py's stacked gate/up, split as the members return it (the HF Llama MLP form)
    g, u = ops.w1a16(x, WGU, SGU, D, None, None, None).split([I, I], -1)
    return ops.w1a16(F.silu(g) * u, WD, SD, I, None, BIAS, None)


def mlp_slices_up_first(x, WGU, SGU, WD, SD, BIAS, SIN):  # sliced, the product written the other way round
    gu = ops.w1a16(x, WGU, SGU, D, None, None, None)
    return ops.w1a16(gu[..., I:] * F.silu(gu[..., :I]), WD, SD, I, None, None, None)


def mlp_swapped(x, WGU, SGU, WD, SD, BIAS, SIN):          # [up | gate]: not the kernel's order, must stay as it is
    gu = ops.w1a16(x, WGU, SGU, D, None, None, None)
    return ops.w1a16(F.silu(gu[..., I:]) * gu[..., :I], WD, SD, I, None, None, None)


def mlp_input_scale(x, WGU, SGU, WD, SD, BIAS, SIN):      # an input scale on the down projection: not rewritten
    g, u = ops.w1a16(x, WGU, SGU, D, None, None, None).split([I, I], -1)
    return ops.w1a16(F.silu(g) * u, WD, SD, I, SIN, None, None)


def mlp_two_uses(x, WGU, SGU, WD, SD, BIAS, SIN):         # the product is used again: no kernel would be saved, left alone
    g, u = ops.w1a16(x, WGU, SGU, D, None, None, None).split([I, I], -1)
    h = F.silu(g) * u
    return ops.w1a16(h, WD, SD, I, None, None, None) + h[..., :D]


def mlp_separate(x, WGU, SGU, WD, SD, BIAS, SIN):         # gate and up from two ops (not fused): nothing to read both from
    g = ops.w1a16(x, WGU[:I], SGU[:I], D, None, None, None)
    u = ops.w1a16(x, WGU[I:], SGU[I:], D, None, None, None)
    return ops.w1a16(F.silu(g) * u, WD, SD, I, None, None, None)


X = torch.randn(1, 1, D).to(torch.bfloat16)
CASES = [(mlp_split, 1), (mlp_slices_up_first, 1), (mlp_swapped, 0), (mlp_input_scale, 0), (mlp_two_uses, 0),
         (mlp_separate, 0)]


@pytest.mark.parametrize("f,expect", CASES)
def test_pass_on_aten_graphs(f, expect):
    """On the ATen graph (silu as aten.silu, slices or split): rewritten only where it should be, the silu and the
    product gone with it, the same output."""
    gm = make_fx(f, tracing_mode="fake")(X, *W)
    assert fuse_glu(gm.graph) == expect
    gm.graph.lint()
    gm.recompile()
    ops_left = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert (torch.ops.binaryllm.w1a16_glu.default in ops_left) == bool(expect)
    if expect:
        assert torch.ops.aten.silu.default not in ops_left and torch.ops.aten.mul.Tensor not in ops_left
    assert torch.equal(gm(X, *W), f(X, *W))


@pytest.mark.parametrize("f,expect", CASES[:3])
def test_pass_inside_torch_compile(f, expect):
    """Installed as inductor's post-grad pass (silu decomposed to fp32 there): the compiled function rewrites the
    same matches.  Rewritten, it gives the eager output exactly (the op rounds as eager does); left alone, inductor
    fuses silu and the product without rounding between them, so it is only close."""
    p = GluIntoPackedLinear()
    torch._dynamo.reset()
    y = torch.compile(f, options={"post_grad_custom_post_pass": p, "fx_graph_cache": False})(X, *W)
    assert p.rewrites == expect
    ref = f(X, *W)
    if expect:
        assert torch.equal(y, ref)
    else:
        assert torch.allclose(y.float(), ref.float(), rtol=2 ** -6, atol=2 ** -6 * ref.abs().max().item())


def test_glu_op_matches_the_two_ops_it_replaces():
    gu = torch.randn(3, 2 * I).to(torch.bfloat16)
    ref = ops.w1a16(F.silu(gu[:, :I]) * gu[:, I:], WD, SD, I, None, BIAS, None)
    assert torch.equal(ops.w1a16_glu(gu, WD, SD, I, BIAS, None), ref)


def test_decode_compile_options_install_the_pass():
    from binaryllm.decode import compile_options
    assert isinstance(compile_options()["post_grad_custom_post_pass"], GluIntoPackedLinear)
    assert "post_grad_custom_post_pass" not in compile_options(glu=False)
