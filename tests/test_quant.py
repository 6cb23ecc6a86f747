"""The math: F(x, t), its exact derivative, the fused dual-scaled binarizer, schedules."""
import math

import pytest
import torch

from binaryllm.quant import (ScheduleError, TSchedule, cosine_lr, hard_binarize, irnet_t, phase_of,
                             progressive, progressive_grad, row_scale, scaled_binarize,
                             scaled_binarize_reference, sign)

TS = [1e-6, 1e-3, 0.3, 1.0, 5.0, 20.0, 104.6, 200.0, 1000.0]


@pytest.mark.parametrize("t", TS)
def test_progressive_value_and_limits(t):
    x = torch.linspace(-3, 3, 601, dtype=torch.float64)
    y = progressive(x, t)
    if t >= 1e-4:
        assert torch.allclose(y, torch.tanh(t * x) / math.tanh(t), atol=1e-12)
    assert progressive(torch.tensor([1.0, -1.0], dtype=torch.float64), t).tolist() == pytest.approx([1.0, -1.0])
    if t <= 1e-3:
        assert torch.allclose(y, x, rtol=1e-5, atol=1e-6)  # t -> 0: F -> x
    if t >= 200:
        mask = x.abs() > 0.05
        assert torch.allclose(y[mask], torch.sign(x[mask]), atol=1e-6)  # t -> inf: F -> sign
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("t", TS)
def test_progressive_grad_matches_finite_differences(t):
    x = torch.linspace(-2.5, 2.5, 401, dtype=torch.float64)
    h = 1e-6 / max(t, 1.0)
    fd = (progressive(x + h, t) - progressive(x - h, t)) / (2 * h)
    g = progressive_grad(x, t)
    assert torch.isfinite(g).all()
    assert torch.allclose(g, fd, rtol=1e-4, atol=1e-4 * max(t, 1.0))


@pytest.mark.parametrize("t", [1e-5, 0.5, 3.0, 20.0, 200.0])
def test_progressive_grad_in_float32_and_large_t(t):
    x = torch.linspace(-2, 2, 1001)
    g = progressive_grad(x, t)
    assert torch.isfinite(g).all() and (g >= 0).all()
    exact = progressive_grad(x.double(), t)
    assert torch.allclose(g.double(), exact, rtol=1e-4, atol=1e-5 * max(t, 1))


@pytest.mark.parametrize("t", [0.4, 3.0, 25.0])
def test_fused_cpt_gradcheck(t):
    """With gradients through S_a the fused backward is the exact derivative of the whole map
    (with S_a detached it is, by design, not; that mode is checked against plain autograd below)."""
    sa_grad = True
    torch.manual_seed(0)
    w = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    s = (1 + 0.1 * torch.randn(5, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda w, s: scaled_binarize(w, s, "cpt", t, sa_grad), (w, s), eps=1e-7,
                                    atol=1e-5)


@pytest.mark.parametrize("kind", ["cpt", "ste", "irnet", "hard", "sign", "identity"])
@pytest.mark.parametrize("sa_grad", [False, True])
def test_fused_equals_plain_autograd(kind, sa_grad):
    torch.manual_seed(1)
    w = torch.randn(16, 33, dtype=torch.float64)
    s = 1 + 0.2 * torch.rand(16, dtype=torch.float64)
    g = torch.randn(16, 33, dtype=torch.float64)
    outs = []
    for fn in (scaled_binarize, scaled_binarize_reference):
        w1, s1 = w.clone().requires_grad_(), s.clone().requires_grad_()
        y = fn(w1, s1, kind, 2.5, sa_grad, 1.0)
        (y * g).sum().backward()
        z = torch.zeros_like
        outs.append((y.detach(), z(w1) if w1.grad is None else w1.grad, z(s1) if s1.grad is None else s1.grad))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_fused_saves_only_weight_and_row_scale():
    """The backward keeps W and S_l (leaves) and t (a 0-d tensor), nothing of weight size besides."""
    w = torch.randn(64, 128, requires_grad=True)
    s = torch.ones(64, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = scaled_binarize(w, s, "cpt", 5.0)
    assert len(saved) == 3
    assert saved[0] is w and saved[1] is s and saved[2].dim() == 0
    y.sum().backward()
    assert w.grad.shape == w.shape and s.grad.shape == s.shape


def test_bf16_autocast_is_sound_at_extreme_t():
    from binaryllm.nn import BinaryLinear
    torch.manual_seed(0)
    lin = BinaryLinear(32, 16, bias=True)
    torch.nn.init.normal_(lin.weight, std=0.02)
    x = torch.randn(4, 32)
    for t in (1e-6, 0.3, 200.0, 5000.0):
        lin.kind, lin.t = "cpt", t
        lin.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = lin(x)
        assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
        y.float().sum().backward()
        assert torch.isfinite(lin.weight.grad).all() and torch.isfinite(lin.scale_l.grad).all()


def test_row_scale_and_hard_binarize_values():
    w = torch.tensor([[1.0, -3.0, 0.0], [0.5, 0.5, -0.5]])
    assert torch.allclose(row_scale(w).view(-1), torch.tensor([4 / 3, 0.5]))
    s_l = torch.tensor([2.0, 1.0])
    b, scale = hard_binarize(w, s_l)
    assert torch.equal(b, torch.tensor([[1.0, -1.0, 1.0], [1.0, 1.0, -1.0]]))  # sign(0) = +1
    assert torch.allclose(scale, torch.tensor([8 / 3, 0.5]))
    assert torch.equal(sign(torch.tensor([0.0, -0.0, 2.0])), torch.tensor([1.0, 1.0, 1.0]))


def test_dual_scaled_weight_value_and_shapes():
    torch.manual_seed(0)
    w = torch.randn(6, 10)
    s = torch.rand(6) + 0.5
    y = scaled_binarize(w, s, "cpt", 7.0)
    sa = w.abs().mean(1, keepdim=True)
    assert y.shape == w.shape
    assert torch.allclose(y, s.view(-1, 1) * sa * torch.tanh(7.0 * w / sa) / math.tanh(7.0), atol=1e-6)
    # t large: the CPT weight equals the hard-sign weight
    y_big = scaled_binarize(w, s, "cpt", 1e4)
    b, scale = hard_binarize(w, s)
    close = (w / sa).abs() > 1e-2
    assert torch.allclose(y_big[close], (b * scale.view(-1, 1))[close], atol=1e-5)


def test_paper_schedule_values():
    s = TSchedule().validate()
    vals = s.values_all()
    assert len(vals) == 20
    assert vals[0] == pytest.approx(1.3 * math.exp(0.22) - 1.3)
    assert vals[-1] == pytest.approx(1.3 * math.exp(0.22 * 20) - 1.3)
    assert vals[-1] == pytest.approx(104.586, rel=1e-4)
    assert all(b > a for a, b in zip(vals, vals[1:]))


def test_other_schedules_and_validation():
    assert TSchedule(kind="linear", phases=5, t_start=1, t_end=9).validate().values_all() == [1, 3, 5, 7, 9]
    assert TSchedule(kind="constant", phases=3, t_end=4).validate().values_all() == [4, 4, 4]
    assert TSchedule(kind="list", values=[0.5, 2, 8]).validate().values_all() == [0.5, 2, 8]
    with pytest.raises(ScheduleError):
        TSchedule(kind="list", values=[3, 1]).validate()
    with pytest.raises(ScheduleError):
        TSchedule(kind="linear", t_start=-1).validate()
    with pytest.raises(ScheduleError):
        TSchedule(kind="list").validate()
    with pytest.raises(ScheduleError):
        TSchedule(kind="cubic").validate()


def test_phase_of_and_irnet_and_lr():
    assert [phase_of(s, 40, 20) for s in (0, 1, 2, 39)] == [1, 1, 2, 20]
    assert phase_of(5, 7, 20) <= 20
    assert irnet_t(0, 100) == pytest.approx(1e-3)
    assert irnet_t(99, 100) == pytest.approx(10.0)
    assert irnet_t(50, 101) == pytest.approx(0.1)  # log-linear midpoint
    assert cosine_lr(0, 100, 1e-4, 2e-6) == pytest.approx(1e-4)
    assert cosine_lr(100, 100, 1e-4, 2e-6) == pytest.approx(2e-6)
    assert cosine_lr(0, 100, 1e-4, 2e-6, warmup=10) == pytest.approx(1e-5)
