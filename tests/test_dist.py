"""Multi-process training (FSDP2, gloo, 2 CPU processes through ``binaryllm convert --gpus 2 --device cpu``, which
relaunches itself under torchrun): same losses as one process with the same global batch, a rank that dies makes
the run stop (not hang), and the sharded checkpoint resumes exactly."""
import json
import os

import pytest
import torch

import binaryllm as bl
from binaryllm.cli import main

ARGS = ["--device", "cpu", "--seq-len", "32", "--batch-size", "4", "--tokens", "1280", "--init-steps", "2",
        "--phases", "4", "--log-every", "1", "--eval-batches", "2", "--save-every", "2", "--no-progress"]


def _train_rows(run):
    return [json.loads(x) for x in open(run / "metrics.jsonl") if '"train"' in x]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, text_file):
    d = tmp_path_factory.mktemp("dist")
    base = [str(tiny_model_dir), "--data", str(text_file), "--cache-dir", str(d / "cache"), *ARGS]
    assert main(["convert", *base, "--out", str(d / "one")]) == 0
    assert main(["convert", *base, "--out", str(d / "two"), "--gpus", "2"]) == 0
    return d, base


def test_two_processes_train_like_one(runs):
    d, _ = runs
    one, two = _train_rows(d / "one"), _train_rows(d / "two")
    assert len(one) == len(two) == 10
    # identical model after stage 1 and identical first gradients (global batch split 2 + 2 across the ranks)
    assert two[0]["loss"] == pytest.approx(one[0]["loss"], rel=1e-6)
    assert two[0]["grad_norm"] == pytest.approx(one[0]["grad_norm"], rel=1e-5)
    # later steps: the same curve (fp32 sums in another order only). Tight enough to see the first Adam step's bias
    # correction: torch.distributed.checkpoint once initialised the optimizer at the step-0 checkpoint (AdamW's
    # step count then started at 1), which moved these losses by ~1e-4 here and by 4 nats on a 4-layer SmolLM2 at
    # lr 1e-3
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    # sharded checkpoints; the finished run is an ordinary run folder: load_run and pack work unchanged
    ck = d / "two" / "checkpoints" / (d / "two" / "checkpoints" / "latest").read_text().strip()
    assert sorted(p.name for p in ck.iterdir() if p.suffix == ".distcp") == ["__0_0.distcp", "__1_0.distcp"]
    assert json.loads((ck / "state.json").read_text())["world_size"] == 2
    model, _ = bl.load_run(d / "two", frozen=False)
    ref, _ = bl.load_run(d / "one", frozen=False)
    for (n, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.allclose(a, b, atol=2e-3), n                  # latent weights: lr 1e-4 x 10 steps apart at most
    s1, s2 = (json.loads((d / r / "summary.json").read_text()) for r in ("one", "two"))
    assert s2["val_loss_sign"] == pytest.approx(s1["val_loss_sign"], rel=1e-3) and s2["world_size"] == 2
    assert main(["pack", str(d / "two"), "--out", str(d / "two-1bit")]) == 0


def test_keeping_gathered_weights_to_the_backward_trains_the_same(runs):
    """--no-fsdp-reshard (one all-gather fewer per block and step) computes the same thing."""
    d, base = runs
    assert main(["convert", *base, "--out", str(d / "keep"), "--gpus", "2", "--no-fsdp-reshard"]) == 0
    assert "fsdp_reshard: false" in (d / "keep" / "run.yaml").read_text()
    one, keep = _train_rows(d / "one"), _train_rows(d / "keep")
    assert len(keep) == len(one)
    for a, b in zip(one, keep):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)


def test_a_dying_rank_stops_the_run_and_the_sharded_checkpoint_resumes_exactly(runs, capsys, monkeypatch):
    d, base = runs
    out = d / "killed"
    monkeypatch.setenv("BINARYLLM_FAULT_RANK_STEP", "1:4")      # rank 1 exits right after the step-4 checkpoint
    monkeypatch.setenv("BINARYLLM_DIST_TIMEOUT", "60")
    rc = main(["convert", *base, "--out", str(out), "--gpus", "2"])
    assert rc != 0 and not (out / "summary.json").exists()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000004"
    monkeypatch.delenv("BINARYLLM_FAULT_RANK_STEP")
    # one process cannot read the sharded checkpoint: a one-line error that says how to resume
    assert main(["convert", *base, "--out", str(out), "--resume"]) == 2
    assert "resume it with --gpus N" in capsys.readouterr().err
    assert main(["convert", *base, "--out", str(out), "--gpus", "2", "--resume"]) == 0
    resumed, ref = _train_rows(out), _train_rows(d / "two")
    assert [r["step"] for r in resumed] == list(range(10))
    for a, b in zip(resumed, ref):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)
    assert json.loads((out / "summary.json").read_text())["finished"]
    assert not any(p.name.startswith(".step-") for p in (out / "checkpoints").iterdir())
    assert os.environ.get("BINARYLLM_FAULT_RANK_STEP") is None


def test_resume_on_another_number_of_ranks_reshards(runs):
    d, base = runs
    out = d / "reshard"
    assert main(["convert", *base, "--out", str(out), "--gpus", "2", "--max-steps", "4"]) == 0
    assert main(["convert", *base, "--out", str(out), "--gpus", "4", "--resume"]) == 0   # no --max-steps: to the end
    resumed, ref = _train_rows(out), _train_rows(d / "two")
    assert [r["step"] for r in resumed] == list(range(10))
    for a, b in zip(resumed, ref):   # 2 ranks for steps 0-3, 4 ranks after: the same losses
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)


def test_missing_nccl_falls_back_to_gloo_with_one_warning(monkeypatch):
    import torch.distributed as dist

    from binaryllm.train import dist as D
    for k, v in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(k, v)
    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: seen.setdefault("device", i))
    monkeypatch.setattr(dist, "is_nccl_available", lambda: False)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: seen.update(kw))
    with pytest.warns(UserWarning, match="NCCL is not available: falling back to gloo"):
        info = D.setup("auto")
    assert info.backend == "gloo" and seen["backend"] == "gloo" and seen["device"] == 1
    assert (info.rank, info.world, info.device) == (1, 2, torch.device("cuda", 1))
    assert seen["timeout"].total_seconds() == 600          # a dead peer ends the run instead of a hang


def test_launcher_drops_gpus_and_turns_nvlink_multicast_off(monkeypatch):
    import subprocess

    from binaryllm.cli import launch_torchrun
    got = {}

    class Done:
        returncode = 0

    def fake_run(cmd, env):
        got.update(cmd=cmd, env=env)
        return Done()

    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")            # a user's setting must not turn multicast back on
    monkeypatch.setattr(subprocess, "run", fake_run)
    assert launch_torchrun(2, ["convert", "m", "--gpus", "2", "--gpus=2", "--lr", "1e-3"]) == 0
    assert got["cmd"][-5:] == ["binaryllm", "convert", "m", "--lr", "1e-3"]
    assert "--nproc-per-node=2" in got["cmd"]
    assert got["env"]["NCCL_NVLS_ENABLE"] == "0" and got["env"]["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"


def test_a_cpu_run_on_a_gpu_host_shards_onto_the_cpu(monkeypatch):
    """fully_shard without a mesh puts the shards on the machine's accelerator whenever it has one; a ``--device
    cpu`` run on a one-GPU H100 machine then failed on rank 1.  Here the host claims a CUDA accelerator (the lookup
    fully_shard's default mesh makes) and one process shards a binarized model for the CPU: every shard stays there."""
    import torch.distributed as dist

    from binaryllm.train import dist as D
    from conftest import tiny_model
    monkeypatch.setattr(torch._C, "_get_accelerator", lambda: torch.device("cuda"))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = bl.binarize(tiny_model("llama"), bl.BinaryConfig())
        D.shard(model, bf16=False, device="cpu")
        params = list(model.parameters())
        assert params and {p.device_mesh.device_type for p in params} == {"cpu"}
        assert {p.device.type for p in params} == {"cpu"}
        loss = model(torch.arange(8).view(1, 8), labels=torch.arange(8).view(1, 8)).loss
        loss.backward()
        assert all(p.grad is not None for p in params if p.requires_grad)
    finally:
        dist.destroy_process_group()
