"""Log-likelihood scoring of multiple-choice items, as lm-evaluation-harness does it.

For a (context, continuation) pair: tokens of ``context + continuation`` minus the tokens of ``context``
are the continuation (trailing spaces of the context move to the continuation first); the score is the
sum of the log-probabilities of those tokens, the input cut from the left to ``max_len``.
acc = argmax of the scores; acc_norm = argmax of score / characters of the choice.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .tasks import MCItem


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    return whole[: len(ctx)], whole[len(ctx):]


@torch.no_grad()
def loglikelihoods(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 32, device="cpu",
                   autocast=None, max_len: int = 2048, progress: bool = False) -> list[float]:
    autocast = autocast or contextlib.nullcontext
    enc = [encode_pair(tokenizer, c, x) for c, x in pairs]
    reqs = []
    for i, (c, x) in enumerate(enc):
        if not x:
            raise ValueError(f"empty continuation for request {i}")
        full = (c + x)[-(max_len + 1):]
        reqs.append((i, full[:-1], len(x)))
    order = sorted(range(len(reqs)), key=lambda j: -len(reqs[j][1]))  # long first: fewer padding tokens
    out = [0.0] * len(reqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = range(0, len(order), batch_size)
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="scoring", unit="batch")
    model.eval()
    for b in batches:
        chunk = [reqs[j] for j in order[b:b + batch_size]]
        L = max(len(r[1]) for r in chunk)
        ids = torch.full((len(chunk), L), pad, dtype=torch.long)
        for k, (_, inp, _) in enumerate(chunk):
            ids[k, : len(inp)] = torch.tensor(inp)
        with autocast():
            logits = model(input_ids=ids.to(device)).logits
        # log-softmax only over the rows that predict continuation tokens
        rows = torch.cat([torch.arange(len(inp) - n, len(inp)) + k * L for k, (_, inp, n) in enumerate(chunk)])
        targets = torch.tensor([t for (i, _, n) in chunk for t in (enc[i][0] + enc[i][1])[-n:]])
        picked = logits.reshape(-1, logits.shape[-1])[rows.to(logits.device)].float()
        lp = F.log_softmax(picked, dim=-1).gather(1, targets.to(logits.device).view(-1, 1)).view(-1).tolist()
        k0 = 0
        for (i, _, n) in chunk:
            out[i] = float(sum(lp[k0:k0 + n]))
            k0 += n
    return out


def score_items(model, tokenizer, items: list[MCItem], **kw) -> dict:
    pairs = [(c, x) for it in items for c, x in zip(it.contexts, it.continuations)]
    lls = loglikelihoods(model, tokenizer, pairs, **kw)
    acc = acc_norm = 0
    k = 0
    for it in items:
        n = len(it.contexts)
        s = lls[k:k + n]
        k += n
        acc += int(max(range(n), key=lambda j: s[j]) == it.gold)
        acc_norm += int(max(range(n), key=lambda j: s[j] / max(it.lengths[j], 1)) == it.gold)
    n = max(len(items), 1)
    chance = 100.0 * sum(1 / len(it.contexts) for it in items) / n     # expected acc of a uniform guess
    return {"acc": 100.0 * acc / n, "acc_norm": 100.0 * acc_norm / n, "n": len(items), "chance": chance}
