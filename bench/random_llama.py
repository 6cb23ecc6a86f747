"""Write a random-weight Llama of a given shape as a Hugging Face folder, with the embedded SmolLM2 tokenizer, so
that `binaryllm convert` (and `--gpus N`) can train it on the default corpus: speed and scaling measurements on
models larger than SmolLM2 without downloading one.  Not a language model: its losses mean nothing.

    python bench/random_llama.py --shape llama-1b --out /tmp/llama-1b
    binaryllm convert /tmp/llama-1b --gpus 2 --seq-len 2048 --batch-size 32 ...
"""
import argparse
import sys

import torch


def main(argv=None) -> int:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from binaryllm.bench import SHAPES_BY_NAME as shapes
    from binaryllm.models import load_model
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(shapes), default="llama-1b")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    _, tok, _ = load_model("", False, "")
    cfg = LlamaConfig(**{**shapes[a.shape], "vocab_size": len(tok)}, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(a.seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(a.out)
    tok.save_pretrained(a.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"{a.shape}: {n / 1e9:.3f}B parameters (random, bf16) written to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
