"""Data reading/caching/splitting, the default corpus, config precedence, and the CLI end to end."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from binaryllm import config as C
from binaryllm.cli import main
from binaryllm.data import BlockOrder, read_documents, split_blocks, to_blocks, tokenize_sources
from binaryllm.data.default import build_default_corpus, split_of
from binaryllm.errors import BinaryLLMError


def test_read_text_folder_jsonl(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("alpha")
    (tmp_path / "d" / "b.md").write_text("beta")
    (tmp_path / "c.jsonl").write_text('{"text": "gamma"}\n\n{"text": "delta"}\n')
    docs = list(read_documents([str(tmp_path / "d"), str(tmp_path / "c.jsonl")]))
    assert docs == ["alpha", "beta", "gamma", "delta"]
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(BinaryLLMError, match="no field 'text'.*--text-field"):
        list(read_documents([str(tmp_path / "bad.jsonl")]))
    with pytest.raises(BinaryLLMError, match="does not exist"):
        list(read_documents([str(tmp_path / "missing.txt")]))


def test_tokenize_once_cached_blocks_and_split(tmp_path, tokenizer, text_file, monkeypatch):
    cache = str(tmp_path / "cache")
    a = tokenize_sources(tokenizer, [str(text_file)], cache_dir=cache)
    assert a.dtype == np.int32 and a[-1] == tokenizer.eos_token_id
    assert list(Path(cache, "tokens").glob("*.npy"))
    monkeypatch.setattr(type(tokenizer), "__call__", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    b = tokenize_sources(tokenizer, [str(text_file)], cache_dir=cache)  # from the cache, no tokenizing
    assert np.array_equal(a, b)
    blocks = to_blocks(a, 64)
    assert blocks.shape == (len(a) // 64, 64) and torch.equal(blocks[1], torch.from_numpy(a[64:128]).long())
    tr, va = split_blocks(blocks, 0.1)
    assert len(va) == int(np.ceil(len(blocks) * 0.1)) and torch.equal(va[-1], blocks[-1])
    with pytest.raises(BinaryLLMError, match="fewer than one block"):
        to_blocks(a[:10], 64)


def test_empty_corpus_is_an_error(tmp_path, tokenizer):
    (tmp_path / "e.txt").write_text("   \n")
    with pytest.raises(BinaryLLMError, match="empty"):
        tokenize_sources(tokenizer, [str(tmp_path / "e.txt")], cache_dir=str(tmp_path))


def test_block_order_is_seeded_and_covers_each_epoch():
    o1, o2 = BlockOrder(10, 4, seed=3), BlockOrder(10, 4, seed=3)
    seq = torch.cat([o1.indices(k) for k in range(5)])  # 20 = two epochs
    assert torch.equal(seq, torch.cat([o2.indices(k) for k in range(5)]))
    assert sorted(seq[:10].tolist()) == list(range(10)) and sorted(seq[10:].tolist()) == list(range(10))
    assert not torch.equal(seq, torch.cat([BlockOrder(10, 4, seed=4).indices(k) for k in range(5)]))


def test_default_corpus_from_debian_packages(tmp_path):
    d = build_default_corpus(str(tmp_path))
    man = json.loads((d / "manifest.json").read_text())
    assert sum(man["bytes"].values()) >= 20_000_000
    assert set(man["bytes_per_source"]) == {"bible", "fortunes", "python-doc", "perl-doc"}
    ids = {s: {json.loads(ln)["source"] for ln in open(d / f"{s}.jsonl")} for s in ("train", "val", "test")}
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])
    assert all(split_of(i) == "test" for i in ids["test"])
    first = json.loads(open(d / "train.jsonl").readline())
    assert first["text"].startswith("In the beginning God created the heaven and the earth.")


def test_config_yaml_and_cli_precedence(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("binary:\n  method: ste\n  phases: 7\ntrain:\n  lr: 0.001\n  tokens: 1M\n")
    from binaryllm.cli import build_parser, config_from_args
    args = build_parser().parse_args(["convert", "--out", "x", "--config", str(y), "--lr", "0.002",
                                      "--t-values", "1", "2", "--no-init"])
    cfg, explicit = config_from_args(args)
    assert cfg.binary.method == "ste" and cfg.binary.phases == 7      # from YAML
    assert cfg.train.lr == 0.002 and cfg.train.tokens == "1M"          # CLI beats YAML; YAML beats default
    assert cfg.binary.t_values == [1.0, 2.0] and cfg.binary.init is False
    assert C.parse_tokens("20M") == 20_000_000 and C.parse_tokens("1.5B") == 1_500_000_000
    with pytest.raises(BinaryLLMError, match="unknown option train.lrr"):
        C.from_dict({"train": {"lrr": 1}})
    with pytest.raises(BinaryLLMError, match="token budget"):
        C.parse_tokens("lots")


def test_shipped_configs_load():
    """Every YAML under configs/ loads (a renamed option would otherwise break a documented command)."""
    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.glob("*.yaml"))
    assert len(files) >= 3
    for f in files:
        cfg = C.load_yaml(f)
        assert C.parse_tokens(cfg.train.tokens) > 0
    best = C.load_yaml(root / "h100-best.yaml")
    assert best.binary.method == "cpt" and best.train.distill and best.train.lr == 1e-3
    assert C.parse_tokens(best.train.tokens) == 100_000_000


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    out = capsys.readouterr().out
    for _, f in C.flat_fields():
        if f.name != "model":
            assert "--" + f.name.replace("_", "-") in out


@pytest.mark.parametrize("argv,msg", [
    (["--method", "xnor"], "unknown method"),
    (["--t-schedule", "list", "--t-values", "5", "1"], "invalid t schedule"),
    (["/no/such/model"], "does not exist"),
    (["--seq-len", "100000"], "fewer than one block"),
])
def test_bad_input_gives_one_line_errors(tmp_path, tiny_model_dir, text_file, capsys, argv, msg):
    base = [str(tiny_model_dir)] if not argv[0].startswith("/") else []
    rc = main(["convert", *base, *argv, "--data", str(text_file), "--out", str(tmp_path / "r"), "--no-progress",
               "--cache-dir", str(tmp_path / "c"), "--tokens", "2k"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("binaryllm: error:") and msg in err and "\n" not in err


def _cli(tmp_path, model_dir, text_file, out, *extra):
    return [sys.executable, "-m", "binaryllm", "convert", str(model_dir), "--data", str(text_file),
            "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--seq-len", "64",
            "--batch-size", "4", "--tokens", "7680", "--lr", "3e-3", "--init-steps", "3", "--log-every", "1",
            "--save-every", "5", "--phases", "6", "--eval-batches", "2", *extra]


def test_cli_run_folder_and_sigkill_resume(tmp_path, tiny_model_dir, text_file):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    a = tmp_path / "a"
    subprocess.run(_cli(tmp_path, tiny_model_dir, text_file, a), check=True, env=env, capture_output=True)
    for f in ("run.yaml", "config.json", "tokenizer.json", "metrics.jsonl", "model.safetensors", "binary.json",
              "summary.json"):
        assert (a / f).is_file(), f
    assert not list(a.glob("*.pickle")) and not list(a.rglob("*.bin")) and not list(a.rglob("*.pt"))
    # kill -9 a second identical run once it has written its step-10 checkpoint, then resume it
    b = tmp_path / "b"
    p = subprocess.Popen(_cli(tmp_path, tiny_model_dir, text_file, b), env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (b / "checkpoints" / "step-00000010").exists():
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (b / "summary.json").exists()
    r = subprocess.run(_cli(tmp_path, tiny_model_dir, text_file, b) + ["--resume"], env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    la = [json.loads(x) for x in open(a / "metrics.jsonl") if '"train"' in x]
    lb = [json.loads(x) for x in open(b / "metrics.jsonl") if '"train"' in x]
    assert [x["step"] for x in lb] == list(range(30))
    assert [x["loss"] for x in la] == [x["loss"] for x in lb]
    sa, sb = json.loads((a / "summary.json").read_text()), json.loads((b / "summary.json").read_text())
    assert sa["val_loss_sign"] == sb["val_loss_sign"]
    # the folder opens as a frozen 1-bit model
    import binaryllm as bl
    model, tok = bl.load_run(a)
    for m in bl.binary_modules(model).values():
        assert set(m.weight.unique().tolist()) <= {-1.0, 1.0}
    # a second convert into the same folder is refused; resume of a non-run too
    r = subprocess.run(_cli(tmp_path, tiny_model_dir, text_file, a), env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "already holds a run" in r.stderr
    r = subprocess.run(_cli(tmp_path, tiny_model_dir, text_file, tmp_path / "none") + ["--resume"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "holds no run" in r.stderr
    r = subprocess.run(_cli(tmp_path, tiny_model_dir, text_file, b) + ["--resume", "--lr", "1e-2"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "train.lr" in r.stderr


def test_unreachable_hub_id_and_bad_folder_are_clear_errors(tmp_path):
    code = ("from binaryllm.models import load_model\n"
            "from binaryllm.errors import BinaryLLMError\n"
            "try:\n    load_model('no-such-org/no-such-model')\n"
            "except BinaryLLMError as e:\n    print('ERR', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert "ERR cannot load model no-such-org/no-such-model" in r.stdout
    (tmp_path / "empty").mkdir()
    from binaryllm.models import resolve
    with pytest.raises(BinaryLLMError, match="no config.json"):
        resolve(str(tmp_path / "empty"))
    with pytest.raises(BinaryLLMError, match="does not exist"):
        resolve(str(tmp_path / "x.gguf"))
