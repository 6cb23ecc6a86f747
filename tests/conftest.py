"""Shared fixtures: tiny random models of several architectures, a small trained BPE tokenizer, and
learnable token data (so that "the loss falls" is a real check)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TEXT = (Path("/usr/share/common-licenses/GPL-3").read_text() if Path("/usr/share/common-licenses/GPL-3").is_file()
        else "the quick brown fox jumps over the lazy dog. " * 400)


def tiny_config(arch: str, vocab: int = 96):
    import transformers as tf
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if arch == "llama":
        return tf.LlamaConfig(**common)
    if arch == "qwen2":
        return tf.Qwen2Config(**common)
    if arch == "qwen3":
        return tf.Qwen3Config(head_dim=16, **common)
    if arch == "mistral":
        return tf.MistralConfig(**common)
    if arch == "gemma":
        return tf.GemmaConfig(head_dim=16, **common)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    raise ValueError(arch)


def tiny_model(arch: str = "llama", vocab: int = 96, seed: int = 0):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(tiny_config(arch, vocab))
    return m.float().eval()


def sm90_ptx(kernel, sig: dict, const: dict, options: dict, attrs: dict | None = None) -> str:
    """PTX of a Triton (or Gluon: a ``GluonJITFunction``) ``kernel`` compiled on this CPU box for sm_90 as it would be
    launched on a Hopper GPU: ``sig`` maps every argument to its type (``constexpr`` for those in ``const``),
    ``attrs`` the specializations the launcher would add (16-byte alignment).  Skips where Triton is missing."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    if type(kernel).__name__.startswith("Gluon"):
        from triton.experimental.gluon._runtime import GluonASTSource as Source
    else:
        from triton.compiler import ASTSource as Source
    src = Source(kernel, sig, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]


def gpu_packed_model(arch: str = "llama"):
    """``tiny_model(arch)`` in bf16 on the GPU with random packed layers (``bench.random_packed_``): what the GPU
    decode tests run."""
    from binaryllm.bench import random_packed_
    model = tiny_model(arch).to("cuda", torch.bfloat16)
    random_packed_(model)
    return model


def hf_greedy(model, ids, n):
    """n greedy tokens after ``ids`` from transformers' own ``generate``: the decoders' reference."""
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:]


def pattern_blocks(n: int, seq_len: int, vocab: int = 96, seed: int = 0) -> torch.Tensor:
    """Blocks cut from a repeating random sequence: learnable, so training must lower the loss."""
    g = torch.Generator().manual_seed(seed)
    motif = torch.randint(3, vocab, (23,), generator=g)
    stream = motif.repeat((n * seq_len) // 23 + 2)
    offs = torch.randint(0, 23, (n,), generator=g)
    return torch.stack([stream[o: o + seq_len] for o in offs.tolist()])


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    d = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer, tokenizer_dir) -> Path:
    """A tiny random Llama saved as a Hugging Face folder with the BPE tokenizer."""
    d = tmp_path_factory.mktemp("tiny-llama")
    m = tiny_model("llama", vocab=len(tokenizer))
    m.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("text")
    p = d / "corpus.txt"
    p.write_text(TEXT)
    return p
