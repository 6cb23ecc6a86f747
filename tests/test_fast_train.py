"""The fused linear + cross-entropy loss against the plain one (value and gradients), and lm_loss on models."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

import binaryllm as bl
from binaryllm.train.fast import _plain_head, linear_cross_entropy, lm_loss
from conftest import pattern_blocks, tiny_model


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_fused_linear_ce_equals_plain(chunk):
    g = torch.Generator().manual_seed(chunk)
    h = torch.randn(50, 16, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(30, 16, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randint(0, 30, (50,), generator=g)
    t[::7] = -100                                               # ignored positions
    loss = linear_cross_entropy(h, w, t, chunk)
    gh, gw = torch.autograd.grad(3.0 * loss, (h, w))
    ref = F.cross_entropy(h @ w.t(), t, ignore_index=-100)
    rh, rw = torch.autograd.grad(3.0 * ref, (h, w))
    assert torch.allclose(loss, ref, rtol=1e-12)
    assert torch.allclose(gh, rh, rtol=1e-10, atol=1e-12) and torch.allclose(gw, rw, rtol=1e-10, atol=1e-12)


def test_fused_linear_ce_frozen_head_and_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(40, 32, generator=g, requires_grad=True)
    w = torch.randn(50, 32, generator=g)                        # frozen: no gradient computed for it
    t = torch.randint(0, 50, (40,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, t, 16)
    loss.backward()
    ref = F.cross_entropy(h.detach() @ w.t(), t)
    assert loss.dtype == torch.float32 and abs(loss.item() - ref.item()) < 0.02 * ref.item()
    assert h.grad is not None and h.grad.dtype == torch.float32


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_lm_loss_matches_logits_loss_on_binarized_models(arch):
    model = bl.binarize(tiny_model(arch), bl.BinaryConfig())
    twin = copy.deepcopy(model)
    ids = pattern_blocks(2, 16)
    fast = lm_loss(model, ids, chunk=5)
    fast.backward()
    logits = twin(input_ids=ids).logits
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    ref.backward()
    assert torch.allclose(fast, ref, rtol=1e-5)
    for (n, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        if a.grad is not None or b.grad is not None:
            assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), n
    assert _plain_head(model)


@pytest.mark.parametrize("chunk,temp", [(1, 1.0), (7, 2.0), (1000, 0.5)])
def test_fused_distillation_loss_equals_ce_plus_kl_on_logits(chunk, temp):
    from binaryllm.train.fast import linear_ce_distill
    g = torch.Generator().manual_seed(chunk)
    h = torch.randn(50, 16, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(30, 16, dtype=torch.float64, generator=g, requires_grad=True)
    th = torch.randn(50, 12, dtype=torch.float64, generator=g)       # the teacher may be another width
    tw = torch.randn(30, 12, dtype=torch.float64, generator=g)
    t = torch.randint(0, 30, (50,), generator=g)
    loss = linear_ce_distill(h, w, t, th, tw, weight=0.7, temp=temp, chunk=chunk)
    gh, gw = torch.autograd.grad(3.0 * loss, (h, w))
    # the definition of the trainer's distill_kl (which computes in fp32), here in fp64
    ls, lt = F.log_softmax(h @ w.t() / temp, -1), F.log_softmax(th @ tw.t() / temp, -1)
    ref = F.cross_entropy(h @ w.t(), t) + 0.7 * temp * temp * (lt.exp() * (lt - ls)).sum(-1).mean()
    rh, rw = torch.autograd.grad(3.0 * ref, (h, w))
    assert torch.allclose(loss, ref, rtol=1e-12)
    assert torch.allclose(gh, rh, rtol=1e-10, atol=1e-12) and torch.allclose(gw, rw, rtol=1e-10, atol=1e-12)


def test_distillation_training_is_the_same_with_the_fused_loss(tmp_path):
    from binaryllm.train import TrainData, Trainer
    cfg = bl.RunConfig()
    tc = cfg.train
    tc.seq_len, tc.batch_size, tc.tokens, tc.lr, tc.log_every, tc.save_every = 16, 4, str(6 * 4 * 16), 3e-3, 1, 1000
    tc.distill, tc.distill_weight, tc.distill_temp, tc.eval_batches = True, 0.5, 2.0, 1
    # the same arithmetic to 1e-5 holds in fp32; on a GPU, "auto" trains under bf16 autocast, where the chunked
    # loss and the full logits round differently (the H100 runs differed in 5 of 6 losses, twenty-ninth session)
    tc.device = "cpu"
    cfg.binary.init_steps, cfg.binary.phases = 2, 4
    blocks = pattern_blocks(40, 16)
    runs = []
    for fused in (True, False):
        tc.fused_loss = fused
        teacher = tiny_model("llama")
        Trainer(bl.binarize(tiny_model("llama"), cfg.binary), cfg, TrainData(train=blocks[:32], val=blocks[32:]),
                tmp_path / str(fused), teacher=teacher, progress=False).run()
        runs.append([json.loads(x)["loss"] for x in open(tmp_path / str(fused) / "metrics.jsonl") if '"train"' in x])
    assert len(runs[0]) == 6 and runs[0] == pytest.approx(runs[1], rel=1e-5)


def test_bench_train_distill_variants_fused_and_logits_agree(tiny_model_dir):
    from binaryllm.bench import bench_train
    from binaryllm.errors import BinaryLLMError
    rows = bench_train(str(tiny_model_dir), seq_len=16, batch_size=2, steps=2, warmup=1, device="cpu",
                       log=lambda r: None,
                       variants=("cpt+distill/eager", "cpt+distill-logits/eager", "cpt/eager", "cpt/compile-model"))
    assert [r["variant"] for r in rows] == ["cpt+distill/eager", "cpt+distill-logits/eager", "cpt/eager",
                                            "cpt/compile-model"]
    assert rows[3]["loss"] == pytest.approx(rows[2]["loss"], abs=0.02)   # the compiled backbone: same steps
    assert rows[0]["loss"] == pytest.approx(rows[1]["loss"], abs=0.02)    # same steps; bf16 autocast rounding
    assert rows[0]["loss"] > rows[2]["loss"]        # the same CE plus a KL term that is > 0
    assert all(r["tokens_per_s"] > 0 and r["peak_mem_GiB"] is None for r in rows)
    with pytest.raises(BinaryLLMError, match="bench train variant 'cpt\\+kd/eager'"):
        bench_train(str(tiny_model_dir), variants=("cpt+kd/eager",), device="cpu")
    with pytest.raises(BinaryLLMError, match="unknown shape; use random:NAME"):
        bench_train("random:gpt9", variants=("cpt/eager",), device="cpu")


def test_bench_train_on_random_weights_of_a_known_shape(monkeypatch):
    """random:NAME builds the shape from bench.SHAPES_BY_NAME without any download (speed needs no weights)."""
    from binaryllm import bench
    monkeypatch.setitem(bench.SHAPES_BY_NAME, "tiny", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                          num_attention_heads=4, num_key_value_heads=2,
                                                          vocab_size=97, tie_word_embeddings=True))
    rows = bench.bench_train("random:tiny", seq_len=8, batch_size=2, steps=1, warmup=1, device="cpu",
                             log=lambda r: None, variants=("fp/eager", "cpt/eager"))
    assert [r["variant"] for r in rows] == ["fp/eager", "cpt/eager"]
    assert all(r["loss"] == pytest.approx(4.57, abs=0.5) for r in rows)     # ~ln(97): random weights, random ids


def test_compiled_chunk_terms_equal_the_eager_ones():
    """On the GPU the fused losses run each chunk through torch.compile(_chunk_terms); the compiled function
    (here inductor's CPU backend, same graph) must give the eager values: CE, KL and the logit gradient, with
    ignored targets, with and without a teacher, and for a second, shorter chunk (dynamic shapes)."""
    from binaryllm.train.fast import _chunk_fn, _chunk_terms
    assert _chunk_fn(torch.device("cpu")) is _chunk_terms
    compiled = torch.compile(_chunk_terms, dynamic=True)
    g = torch.Generator().manual_seed(0)
    for rows, teacher in ((24, True), (9, True), (24, False)):
        z = torch.randn(rows, 40, generator=g) * 3
        zt = torch.randn(rows, 40, generator=g) * 3 if teacher else None
        tc = torch.randint(0, 40, (rows,), generator=g)
        tc[::5] = -100
        valid = tc != -100
        inv = 1.0 / valid.sum().to(torch.float32)
        coef = torch.tensor(0.7 * 2.0 / rows)
        args = (z, tc, valid, inv, zt, coef, 2.0, True, torch.float32, torch.float32)
        ref, got = _chunk_terms(*args), compiled(*args)
        assert torch.allclose(got[0], ref[0], rtol=1e-5)
        assert (got[1] is None) == (not teacher) and (not teacher or torch.allclose(got[1], ref[1], rtol=1e-5))
        assert torch.allclose(got[2], ref[2], rtol=1e-5, atol=1e-7)


def test_fused_loss_falls_back_to_eager_with_one_warning_when_compiling_fails(monkeypatch):
    """A CUDA box whose torch.compile cannot build the chunk function (no Triton, say) gets the eager terms and one
    warning, not a crash; the values are the eager ones."""
    from binaryllm.train import fast
    monkeypatch.setattr(fast, "_COMPILED_CHUNK", None)

    def broken(fn, **kw):
        def run(*a):
            raise RuntimeError("no triton here")
        return run
    monkeypatch.setattr(torch, "compile", broken)
    fn = fast._chunk_fn(torch.device("cuda"))
    z, tc = torch.randn(4, 6), torch.tensor([1, 2, -100, 0])
    args = (z, tc, tc != -100, torch.tensor(1 / 3), None, torch.tensor(0.0), 1.0, True, torch.float32, torch.float32)
    with pytest.warns(UserWarning, match="compiling the fused loss failed.*no triton here"):
        got = fn(*args)
    ref = fast._chunk_terms(*args)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[2], ref[2])
    assert fast._chunk_fn(torch.device("cuda")) is fast._chunk_terms        # decided once: no second warning
