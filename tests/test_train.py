"""Training: every method lowers the loss; exact resume; NaN stop; atomic checkpoints."""
import json
import math

import pytest
import torch

import binaryllm as bl
from binaryllm.errors import BinaryLLMError
from binaryllm.train import TrainData, Trainer
from binaryllm.train import checkpoint as ckpt_mod
from conftest import pattern_blocks, tiny_model

METHODS = {
    "sign": dict(method="sign"),
    "ste": dict(method="ste"),
    "irnet": dict(method="irnet"),
    "cpt": dict(method="cpt"),
    "cpt-noinit": dict(method="cpt", init=False),
    "cpt-nodual": dict(method="cpt", dual_scale=False),
    "cpt-nohard": dict(method="cpt", hard_fraction=0.0),
    "fp": dict(method="fp"),
}


def run_cfg(steps=40, **binary):
    cfg = bl.RunConfig()
    t = cfg.train
    t.seq_len, t.batch_size, t.tokens = 32, 8, str(steps * 8 * 32)
    t.lr, t.lr_min, t.log_every, t.save_every, t.eval_batches = 3e-3, 1e-4, 1, 1000, 2
    cfg.binary.init_steps = 5
    cfg.binary.init_lr = 0.02
    cfg.binary.phases = 8
    for k, v in binary.items():
        setattr(cfg.binary, k, v)
    return cfg.validate()


def data():
    blocks = pattern_blocks(136, 32)  # validation: other blocks of the same (learnable) stream
    return TrainData(train=blocks[:128], val=blocks[128:])


def losses(path):
    return [json.loads(ln) for ln in open(path / "metrics.jsonl") if '"train"' in ln]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains_and_loss_falls(tmp_path, arch, name):
    cfg = run_cfg(**METHODS[name])
    model = bl.binarize(tiny_model(arch), cfg.binary)
    tr = Trainer(model, cfg, data(), tmp_path, progress=False)
    summary = tr.run()
    assert summary["finished"]
    if name == "sign":
        assert summary["total_steps"] == 0 and math.isfinite(summary["val_loss_sign"])
        return
    rec = losses(tmp_path)
    assert len(rec) == tr.total_steps == 40
    first = sum(r["loss"] for r in rec[:5]) / 5
    last = sum(r["loss"] for r in rec[-5:]) / 5
    assert last < first - 0.3, (first, last)
    if name != "fp":
        assert summary["val_loss_sign"] < 4.2  # the frozen 1-bit model learned too (ln 96 = 4.56)
    kinds = {r["kind"] for r in rec}
    if name.startswith("cpt"):
        ts = [r["t"] for r in rec if r["kind"] == "cpt"]
        assert ts == sorted(ts) and ts[0] == pytest.approx(1.3 * math.exp(0.22) - 1.3)
        assert "sign_gap" in summary
        assert kinds == ({"cpt"} if name == "cpt-nohard" else {"cpt", "ste"})
    if name == "irnet":
        assert rec[0]["t"] == pytest.approx(1e-3) and rec[-1]["t"] == pytest.approx(10.0)


def test_dual_scale_off_keeps_row_scale_at_one(tmp_path):
    cfg = run_cfg(steps=5, dual_scale=False)
    model = bl.binarize(tiny_model(), cfg.binary)
    Trainer(model, cfg, data(), None, progress=False).run()
    for m in bl.binary_modules(model).values():
        assert torch.equal(m.scale_l, torch.ones_like(m.scale_l))


def _train_losses(path, cfg, stop_at=None, resume=False, distill=False):
    model = bl.binarize(tiny_model(), cfg.binary)
    teacher = tiny_model() if distill else None

    def cb(step, loss):
        if stop_at is not None and step == stop_at:
            raise KeyboardInterrupt  # as if the process died right after this step
    tr = Trainer(model, cfg, data(), path, teacher=teacher, progress=False)
    try:
        tr.run(resume=resume, callback=cb)
    except KeyboardInterrupt:
        pass
    return model


@pytest.mark.parametrize("distill", [False, True])
def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path, distill):
    cfg = run_cfg(steps=16)
    cfg.train.save_every = 4
    cfg.train.distill = distill
    a = _train_losses(tmp_path / "a", cfg, distill=distill)
    _train_losses(tmp_path / "b", cfg, stop_at=9, distill=distill)  # dies at step 9; checkpoint at 8
    assert ckpt_mod.latest_checkpoint(tmp_path / "b" / "checkpoints").name == "step-00000008"
    b = _train_losses(tmp_path / "b", cfg, resume=True, distill=distill)
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert [r["step"] for r in lb] == list(range(16))
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
    assert [(r["t"], r["lr"], r["phase"]) for r in la] == [(r["t"], r["lr"], r["phase"]) for r in lb]
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na


def test_distillation_with_compile_compiles_the_teacher_and_trains_the_same(tmp_path):
    """--compile compiles the teacher's blocks too (an eager teacher had doubled the step time on the H100); the
    compiled run's losses match the eager run's."""
    runs = {}
    for compiled in (False, True):
        cfg = run_cfg(steps=6)
        cfg.train.distill, cfg.train.compile = True, compiled
        model = bl.binarize(tiny_model(), cfg.binary)
        teacher = tiny_model()
        Trainer(model, cfg, data(), tmp_path / str(compiled), teacher=teacher, progress=False).run()
        assert getattr(teacher, "_binaryllm_compiled", False) is compiled
        runs[compiled] = [r["loss"] for r in losses(tmp_path / str(compiled))]
    assert runs[True] == pytest.approx(runs[False], rel=1e-3, abs=1e-4)


def test_max_steps_stops_resumably(tmp_path):
    cfg = run_cfg(steps=10)
    cfg.train.max_steps = 4
    model = bl.binarize(tiny_model(), cfg.binary)
    s = Trainer(model, cfg, data(), tmp_path, progress=False).run()
    assert not s["finished"] and s["step"] == 4


def test_max_minutes_stops_with_a_checkpoint_and_resumes(tmp_path):
    cfg = run_cfg(steps=6)
    cfg.train.max_minutes = 1e-9                      # over after the first step
    s = Trainer(bl.binarize(tiny_model(), cfg.binary), cfg, data(), tmp_path, progress=False).run()
    assert not s["finished"] and s["step"] == 1
    assert ckpt_mod.latest_checkpoint(tmp_path / "checkpoints").name == "step-00000001"
    cfg.train.max_minutes = 0
    s = Trainer(bl.binarize(tiny_model(), cfg.binary), cfg, data(), tmp_path, progress=False).run(resume=True)
    assert s["finished"] and [r["step"] for r in losses(tmp_path)] == list(range(6))


def test_nan_found_without_per_step_sync_before_any_checkpoint(tmp_path):
    # no callback: losses are read back at log/checkpoint steps only; a bad one still never reaches a checkpoint
    cfg = run_cfg(steps=12)
    cfg.train.save_every, cfg.train.log_every = 3, 10
    model = bl.binarize(tiny_model(), cfg.binary)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    with pytest.raises(BinaryLLMError, match=r"loss became nan at step 0.*step-00000000"):
        Trainer(model, cfg, data(), tmp_path, progress=False).run()
    assert ckpt_mod.latest_checkpoint(tmp_path / "checkpoints").name == "step-00000000"


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = run_cfg(steps=12)
    cfg.train.save_every = 3
    model = bl.binarize(tiny_model(), cfg.binary)

    def poison(step, loss):
        if step == 4:
            with torch.no_grad():
                model.model.norm.weight.fill_(float("nan"))
    tr = Trainer(model, cfg, data(), tmp_path, progress=False)
    with pytest.raises(BinaryLLMError, match=r"loss became nan at step 5.*step-00000003"):
        tr.run(callback=poison)
    last = ckpt_mod.latest_checkpoint(tmp_path / "checkpoints")
    assert last.name == "step-00000003"
    from safetensors.torch import load_file
    assert all(torch.isfinite(v).all() for v in load_file(last / "model.safetensors").values())


def test_interrupted_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    cfg = run_cfg(steps=4)
    model = bl.binarize(tiny_model(), cfg.binary)
    tr = Trainer(model, cfg, data(), tmp_path, progress=False)
    tr.run()
    ck = tmp_path / "checkpoints"
    before = sorted(p.name for p in ck.iterdir())

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(ckpt_mod, "save_file", boom)
    with pytest.raises(OSError):
        ckpt_mod.save_checkpoint(ck, 99, model, tr.optimizer, {"step": 99})
    assert sorted(p.name for p in ck.iterdir()) == before  # no half-written folder, pointer unchanged
    assert ckpt_mod.latest_checkpoint(ck).name == "step-00000004"


def test_damaged_checkpoint_is_a_clear_error(tmp_path):
    cfg = run_cfg(steps=2)
    model = bl.binarize(tiny_model(), cfg.binary)
    Trainer(model, cfg, data(), tmp_path, progress=False).run()
    last = ckpt_mod.latest_checkpoint(tmp_path / "checkpoints")
    (last / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(BinaryLLMError, match="damaged"):
        Trainer(bl.binarize(tiny_model(), cfg.binary), cfg, data(), tmp_path, progress=False).run(resume=True)


def test_out_of_memory_names_the_option_to_lower(tmp_path, monkeypatch):
    cfg = run_cfg(steps=3)
    model = bl.binarize(tiny_model(), cfg.binary)
    tr = Trainer(model, cfg, data(), tmp_path, progress=False)
    real = type(model.base_model).forward   # the decoder: run by the fused loss and by the logits path alike

    def oom(self, *a, **k):
        if self.training and torch.is_grad_enabled():
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(self, *a, **k)
    monkeypatch.setattr(type(model.base_model), "forward", oom)
    cfg.binary.init = False
    with pytest.raises(BinaryLLMError, match=r"out of memory at step 0 .*lower --batch-size"):
        tr.run()


def test_profile_writes_a_trace_and_an_operator_table_and_keeps_the_losses(tmp_path):
    cfg = run_cfg(steps=6)
    ref = Trainer(bl.binarize(tiny_model(), cfg.binary), cfg, data(), tmp_path / "ref", progress=False).run()
    cfg.train.profile = "2:4"
    s = Trainer(bl.binarize(tiny_model(), cfg.binary), cfg, data(), tmp_path / "p", progress=False).run()
    assert s["val_loss_sign"] == ref["val_loss_sign"]          # profiling observes, it changes nothing
    trace = json.loads((tmp_path / "p" / "profile" / "rank0.json").read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert any(n.startswith("aten::mm") or n.startswith("aten::addmm") for n in names)
    table = (tmp_path / "p" / "profile" / "rank0.txt").read_text()
    assert table.startswith("steps 2..3, rank 0") and "aten::" in table


@pytest.mark.parametrize("spec", ["3", "4:2", "a:b", "-1:2"])
def test_bad_profile_range_is_a_clear_error(spec):
    cfg = run_cfg(steps=6)
    cfg.train.profile = spec
    with pytest.raises(BinaryLLMError, match="--profile wants A:B"):
        cfg.validate()


def test_grad_accum_trains_like_the_larger_batch_stage_1_included(tmp_path):
    """--batch-size 4 --grad-accum 2 = --batch-size 8 (the same blocks, the same averaged gradients), in stage 1
    (binary-aware init) as in training."""
    runs = []
    for bs, acc in ((8, 1), (4, 2)):
        cfg = run_cfg(steps=8)
        cfg.train.amp = "none"
        cfg.train.batch_size, cfg.train.grad_accum = bs, acc
        s = Trainer(bl.binarize(tiny_model(), cfg.binary), cfg, data(), tmp_path / str(acc), progress=False).run()
        rows = [json.loads(x) for x in open(tmp_path / str(acc) / "metrics.jsonl")]
        runs.append(([r["loss"] for r in rows if r["type"] == "init"],
                     [r["loss"] for r in rows if r["type"] == "train"], s["val_loss_sign"], s["init"]["tokens"]))
    (i1, t1, v1, n1), (i2, t2, v2, n2) = runs
    assert len(i1) == 5 and len(t1) == 8 and n1 == n2 == 5 * 8 * 32
    assert i1 == pytest.approx(i2, rel=1e-5) and t1 == pytest.approx(t2, rel=1e-4) and v1 == pytest.approx(v2, rel=1e-4)
