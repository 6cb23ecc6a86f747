"""Perplexity with the protocol of the quantization literature (GPTQ/BiLLM): the text tokenized once,
cut into non-overlapping windows of seq_len tokens (tail dropped), exp(mean token NLL).  ``stride`` < seq_len
gives the sliding-window variant: windows start every ``stride`` tokens and score only the tokens no
earlier window scored (each with up to seq_len - stride tokens of context)."""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from ..errors import BinaryLLMError


@torch.no_grad()
def window_nll(model, blocks: torch.Tensor, batch_size: int = 8, device: str | torch.device = "cpu",
               autocast=None, progress: bool = False) -> tuple[float, int]:
    """(sum of token NLLs, number of predicted tokens) over (N, L) blocks; each window predicts L-1 tokens."""
    autocast = autocast or contextlib.nullcontext
    model.eval()
    total, count = 0.0, 0
    rng = range(0, blocks.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm
        rng = tqdm(rng, desc="perplexity", unit="batch")
    for i in rng:
        ids = blocks[i:i + batch_size].to(device)
        with autocast():
            logits = model(input_ids=ids).logits
        v = logits.shape[-1]
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, v).float(), ids[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += ids[:, 1:].numel()
    return total, count


@torch.no_grad()
def strided_nll(model, tokens: torch.Tensor, seq_len: int, stride: int, device="cpu", autocast=None,
                progress: bool = False) -> tuple[float, int]:
    autocast = autocast or contextlib.nullcontext
    model.eval()
    n = tokens.numel()
    total, count, prev_end = 0.0, 0, 0
    starts = range(0, max(n - 1, 1), stride)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="perplexity (strided)", unit="window")
    for begin in starts:
        end = min(begin + seq_len, n)
        ids = tokens[begin:end].view(1, -1).to(device)
        new = end - max(prev_end, begin + 1)  # tokens not scored before (the first token has no context)
        with autocast():
            logits = model(input_ids=ids).logits[0, :-1].float()
        tgt = ids[0, 1:]
        nll = F.cross_entropy(logits[-new:], tgt[-new:], reduction="sum")
        total += float(nll)
        count += new
        prev_end = end
        if end == n:
            break
    return total, count


def perplexity(model, blocks: torch.Tensor, **kw) -> float:
    total, count = window_nll(model, blocks, **kw)
    return math.exp(total / max(count, 1))


def text_perplexity(model, tokens: torch.Tensor, seq_len: int, stride: int = 0, batch_size: int = 8,
                    device="cpu", autocast=None, progress: bool = False) -> dict:
    """Perplexity of a 1-D token stream: non-overlapping windows, or strided when 0 < stride < seq_len."""
    if tokens.numel() < seq_len:
        raise BinaryLLMError(f"the text has {tokens.numel()} tokens, fewer than one window of --seq-len {seq_len}; "
                             "give more text or lower --seq-len")
    if 0 < stride < seq_len:
        total, count = strided_nll(model, tokens, seq_len, stride, device, autocast, progress)
    else:
        n = tokens.numel() // seq_len
        total, count = window_nll(model, tokens[: n * seq_len].view(n, seq_len), batch_size, device, autocast,
                                  progress)
    return {"ppl": math.exp(total / count), "nll": total / count, "tokens": count}
