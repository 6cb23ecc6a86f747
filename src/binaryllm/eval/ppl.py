"""Perplexity with the protocol of the quantization literature (GPTQ/BiLLM): the text tokenized once,
cut into non-overlapping windows of seq_len tokens (tail dropped), exp(mean token NLL)."""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F


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


def perplexity(model, blocks: torch.Tensor, **kw) -> float:
    total, count = window_nll(model, blocks, **kw)
    return math.exp(total / max(count, 1))
