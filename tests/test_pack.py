"""Bit packing, the packed inference module, and the packed folder round trip."""
import json

import pytest
import torch

import binaryllm as bl
from binaryllm.errors import BinaryLLMError
from binaryllm.export import load_packed, pack, pack_signs, packed_modules, save_packed, unpack_signs
from conftest import pattern_blocks, tiny_model


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (4, 8), (5, 9), (7, 127), (2, 128), (6, 129), (16, 576), (3, 1000)])
def test_pack_unpack_is_bit_exact(shape):
    w = torch.randn(*shape)
    w[0, 0] = 0.0  # sign(0) = +1
    p = pack_signs(w)
    assert p.dtype == torch.uint8 and p.shape == (shape[0], (shape[1] + 7) // 8)
    assert torch.equal(unpack_signs(p, shape[1]), torch.where(w >= 0, 1.0, -1.0))
    if shape[1] % 8:
        assert (p[:, -1] >> (shape[1] % 8)).eq(0).all()  # padding bits are zero


def test_documented_bit_order():
    w = torch.tensor([[1.0, -1, 1, 1, -1, -1, -1, -1, 1]])
    assert pack_signs(w).tolist() == [[0b00001101, 0b00000001]]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_packed_model_computes_the_frozen_model(arch, tmp_path):
    model = bl.binarize(tiny_model(arch), bl.BinaryConfig())
    with torch.no_grad():
        for m in bl.binary_modules(model).values():
            m.scale_l.uniform_(0.5, 1.5)
        first = next(iter(bl.binary_modules(model).values()))
        first.set_input_scale(torch.rand(first.in_features) + 0.5)
    bl.freeze(model)
    ids = pattern_blocks(2, 16)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    pack(model)
    assert not bl.binary_modules(model) and len(packed_modules(model)) > 0
    for m in packed_modules(model).values():  # no dense copy of the weights is kept
        assert {n for n, _ in m.named_buffers()} <= {"weight", "weight_scale", "input_scale", "bias"}
        assert m.weight.dtype == torch.uint8 and not list(m.parameters())
    with torch.no_grad():
        got = model(input_ids=ids).logits
    # fp16 row/input scales are the only rounding: relative error ~1e-3
    assert torch.allclose(got, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95


def test_packed_folder_round_trip_and_sizes(tmp_path, tokenizer):
    model = bl.freeze(bl.binarize(tiny_model("llama", vocab=len(tokenizer)), bl.BinaryConfig()))
    pack(model)
    rep = save_packed(model, tokenizer, tmp_path / "p")
    n_w = sum(m.in_features * m.out_features for m in packed_modules(model).values())
    n_rows = sum(m.out_features for m in packed_modules(model).values())
    assert rep["packed_bits"] == sum(m.out_features * ((m.in_features + 7) // 8) for m in packed_modules(model).values())
    assert rep["input_scales"] == 0
    assert rep["packed_bits"] == n_w // 8 and rep["row_scales"] == 2 * n_rows  # 1 bit/weight, 16 bits/row
    qc = json.loads((tmp_path / "p" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "binaryllm" and qc["format_version"] == 1 and qc["bit_order"] == "lsb-first"
    loaded, tok = load_packed(tmp_path / "p")
    ids = pattern_blocks(2, 16, vocab=len(tokenizer))
    with torch.no_grad():
        a = model.to(torch.bfloat16)(input_ids=ids).logits.float()
        b = loaded(input_ids=ids).logits.float()
    assert torch.allclose(a, b, atol=1e-2) and tok is not None
    for n, m in packed_modules(model).items():
        assert torch.equal(loaded.get_submodule(n).weight, m.weight)


def test_packed_folder_bad_input(tmp_path, tokenizer):
    model = pack(bl.freeze(bl.binarize(tiny_model("llama", vocab=len(tokenizer)), bl.BinaryConfig())))
    d = tmp_path / "p"
    save_packed(model, tokenizer, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 99
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BinaryLLMError, match="format_version 99"):
        load_packed(d)
    cfg["quantization_config"]["format_version"] = 1
    (d / "config.json").write_text(json.dumps(cfg))
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(BinaryLLMError, match="damaged or truncated"):
        load_packed(d)
    with pytest.raises(BinaryLLMError, match="not a packed binaryllm folder"):
        load_packed(tmp_path / "nothing")
    with pytest.raises(BinaryLLMError, match="no binarized layers"):
        pack(tiny_model("llama"))


def test_pack_cli_on_a_run_and_eval_of_the_packed_folder(tmp_path, tiny_model_dir, text_file, capsys):
    from binaryllm.cli import main
    run = tmp_path / "run"
    assert main(["convert", str(tiny_model_dir), "--data", str(text_file), "--out", str(run), "--no-progress",
                 "--cache-dir", str(tmp_path), "--seq-len", "64", "--batch-size", "2", "--tokens", "640",
                 "--init-steps", "1", "--phases", "2"]) == 0
    assert main(["pack", str(run), "--out", str(tmp_path / "packed")]) == 0
    out = capsys.readouterr().out
    assert "packed sign bits" in out and "bf16 model" in out
    frozen, tok = bl.load_run(run)
    packed, _ = bl.load(tmp_path / "packed")
    ids = torch.tensor([tok("the freedom to run the program")["input_ids"]])
    with torch.no_grad():
        a = frozen(input_ids=ids).logits.float()
        b = packed(input_ids=ids).logits.float()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
    assert main(["eval", str(tmp_path / "packed"), "--ppl", str(text_file), "--seq-len", "64", "--no-progress"]) == 0
    assert "packed" in capsys.readouterr().out


def test_plain_transformers_refuses_a_packed_folder(tmp_path, tokenizer):
    """Without binaryllm imported, loading must fail loudly, never give a model with random binarized layers."""
    import subprocess
    import sys
    model = pack(bl.freeze(bl.binarize(tiny_model("llama", vocab=len(tokenizer)), bl.BinaryConfig())))
    save_packed(model, tokenizer, tmp_path / "p")
    code = ("import sys\nfrom transformers import AutoModelForCausalLM\n"
            f"AutoModelForCausalLM.from_pretrained({str(tmp_path / 'p')!r})\n"
            "assert 'binaryllm' not in sys.modules\nprint('LOADED')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "LOADED" not in r.stdout
    assert "mismatch" in r.stderr or "binaryllm" in r.stderr


def test_from_pretrained_after_import_gives_the_packed_model(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM
    model = bl.binarize(tiny_model("llama", vocab=len(tokenizer)), bl.BinaryConfig())
    first = next(iter(bl.binary_modules(model).values()))
    first.set_input_scale(torch.rand(first.in_features) + 0.5)
    model = pack(bl.freeze(model))
    save_packed(model, tokenizer, tmp_path / "p")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "p", dtype=torch.float32)
    ours, _ = load_packed(tmp_path / "p", dtype=torch.float32)
    assert len(packed_modules(hf)) == len(packed_modules(ours))
    for n, m in packed_modules(hf).items():
        assert m.weight.dtype == torch.uint8 and torch.equal(m.weight, packed_modules(ours)[n].weight)
        assert m.weight_scale.dtype == torch.float16
    ids = pattern_blocks(2, 16, vocab=len(tokenizer))
    with torch.no_grad():
        assert torch.equal(hf(input_ids=ids).logits, ours(input_ids=ids).logits)
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 2
    (tmp_path / "p" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BinaryLLMError, match="format_version 2"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "p")


def test_generate_streams_from_a_packed_folder(tmp_path, tokenizer, capsys):
    from binaryllm.cli import main
    model = pack(bl.freeze(bl.binarize(tiny_model("llama", vocab=len(tokenizer)), bl.BinaryConfig())))
    save_packed(model, tokenizer, tmp_path / "p")
    assert main(["generate", str(tmp_path / "p"), "--prompt", "the program", "--max-new-tokens", "8",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("the program") and len(out) > len("the program")
    # greedy: the text of transformers' own greedy tokens (stopping at eos as generate does)
    ids = tokenizer("the program", return_tensors="pt").input_ids
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                         pad_token_id=0, eos_token_id=tokenizer.eos_token_id)
    assert out.strip() == tokenizer.decode(ref[0]).strip()
    assert main(["generate", str(tmp_path / "p"), "--prompt", "the program", "--max-new-tokens", "8",
                 "--device", "cpu", "--sdpa"]) == 0          # SDPA for the one-token steps: the same text
    assert capsys.readouterr().out == out
    assert main(["generate", str(tmp_path / "p"), "--prompt", "the program", "--max-new-tokens", "8",
                 "--device", "cpu", "--compile"]) == 0       # the compiled step: the same text, and a note first
    got = capsys.readouterr()
    assert got.out == out and "compiling the one-token step" in got.err


def test_packed_folder_missing_scale_shape_mismatch_and_unfinished_run(tmp_path, tokenizer, capsys):
    from safetensors.torch import load_file, save_file

    from binaryllm.cli import main
    model = pack(bl.freeze(bl.binarize(tiny_model("llama", vocab=len(tokenizer)), bl.BinaryConfig())))
    d = tmp_path / "p"
    save_packed(model, tokenizer, d)
    st = d / "model.safetensors"
    good = load_file(str(st))
    name = next(iter(packed_modules(model)))
    missing = {k: v for k, v in good.items() if k != f"{name}.weight_scale"}
    save_file(missing, str(st), metadata={"format": "pt"})
    with pytest.raises(BinaryLLMError, match=rf"lacks {name}.weight_scale"):
        load_packed(d)
    wrong = dict(good)
    wrong[f"{name}.weight"] = wrong[f"{name}.weight"][:, :-1].contiguous()
    save_file(wrong, str(st), metadata={"format": "pt"})
    with pytest.raises(BinaryLLMError, match=rf"{name}.weight has shape"):
        load_packed(d)
    # a run folder whose training never finished (no summary / final weights): pack refuses in one line
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.yaml").write_text("binary:\n  method: cpt\n")
    assert main(["pack", str(run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no finished run" in err[0] and "--resume" in err[0]
    assert not (tmp_path / "out").exists()
