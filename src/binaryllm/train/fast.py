"""Training-speed pieces, model-agnostic: a fused linear + cross-entropy loss that never holds the full
(tokens x vocab) logits, and regional ``torch.compile`` of the decoder blocks.

``linear_cross_entropy(h, W, targets)`` = mean over valid targets of CE(h @ W^T, target), computed in chunks of
rows: each chunk's logits are made, turned into the loss and into the gradients for h and W (softmax - onehot)
right away, and dropped.  Backward only scales the stored gradients.  Peak memory: one chunk of logits in
fp32 instead of all of them (SmolLM2 at 16 x 2048 tokens: 6.4 GB -> 0.8 GB with 4096-row chunks).

``lm_loss(model, ids)`` uses it when the model is a plain backbone + linear head (``base_model`` and
``get_output_embeddings()``, no head bias, no logit soft-capping or scaling in the config); otherwise it computes
the logits and the ordinary loss.  ``linear_ce_distill`` / ``lm_distill_loss`` do the same for distillation: the
CE plus weight * temp^2 * KL(teacher || student), the teacher's logits made chunk by chunk from its hidden
states, so neither model's full logits exist (before: the student's and the teacher's, in bf16 and fp32).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _chunk_terms(logits, tc, valid, inv_count, t_logits, kl_coef, temp: float, want_grad: bool, acc, out_dtype):
    """One chunk of rows: (CE sum over valid rows, KL(teacher || student) sum or None, d loss / d logits in
    out_dtype or None).  logits, t_logits: the chunk's (rows, V) matmul outputs in the compute dtype; the
    softmaxes and sums run in ``acc`` (fp32).  inv_count = 1 / valid rows of the whole call, kl_coef = weight *
    temp / rows of the whole call or None without a teacher (0-d tensors, so new values need no recompilation).
    Pure: run eagerly, or compiled on the GPU, where it becomes a few fused passes over the chunk instead of one
    per operation."""
    logits = logits.to(acc)
    lse = torch.logsumexp(logits, dim=-1)
    idx = tc.clamp_min(0).unsqueeze(1)
    ce = ((lse - logits.gather(1, idx).squeeze(1)) * valid).sum()
    kl = p = None
    if t_logits is not None:     # KL(teacher || student) at temperature temp, over every row
        lt = torch.log_softmax(t_logits.to(acc) / temp, dim=-1)
        ls = torch.log_softmax(logits / temp, dim=-1)
        pt = lt.exp()
        kl = (pt * (lt - ls)).sum()
    if want_grad:   # d/dz of CE / count: softmax - onehot; of weight * temp^2 * KL / n: weight * temp * (p_s - p_t) / n
        # in place on fresh temporaries: eager (CPU) peak memory stays at ~2 chunks of logits; compiled, the same
        p = torch.exp(logits - lse.unsqueeze(1))
        p.scatter_add_(1, idx, -valid.to(acc).unsqueeze(1))
        p.mul_((valid.to(acc) * inv_count).unsqueeze(1))
        if t_logits is not None:
            p.add_(ls.exp_().sub_(pt).mul_(kl_coef))
        p = p.to(out_dtype)
    return ce, kl, p


_COMPILED_CHUNK = None


def _chunk_fn(device: torch.device):
    """The compiled ``_chunk_terms`` on CUDA (built on first use), the eager one elsewhere, and the eager one with
    one warning if compiling fails (no Triton, an unsupported GPU): slower, never a crash."""
    global _COMPILED_CHUNK
    if device.type != "cuda":
        return _chunk_terms
    if _COMPILED_CHUNK is None:
        compiled = torch.compile(_chunk_terms, dynamic=True)

        def guarded(*args):
            global _COMPILED_CHUNK
            try:
                return compiled(*args)
            except torch.cuda.OutOfMemoryError:
                raise                # the trainer names the option to lower
            except Exception as e:   # compilation, not the math: the eager function computes the same terms
                import warnings
                warnings.warn(f"compiling the fused loss failed ({type(e).__name__}: {str(e).splitlines()[0][:120]});"
                              " using the eager loss (slower, same values)", stacklevel=2)
                _COMPILED_CHUNK = _chunk_terms
                return _chunk_terms(*args)
        _COMPILED_CHUNK = guarded
    return _COMPILED_CHUNK


class _LinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, targets, chunk: int, compute_dtype, th=None, tw=None, kl_weight: float = 0.0,
                temp: float = 1.0):
        n = h.shape[0]
        acc = torch.promote_types(compute_dtype, torch.float32)   # fp32, or fp64 for fp64 inputs
        valid_all = targets != -100
        count = valid_all.sum().clamp_min(1).to(acc)
        inv_count = 1.0 / count
        kl_coef = (torch.full((), kl_weight * temp / max(n, 1), dtype=acc, device=h.device)   # no host sync
                   if th is not None else None)
        hc_all = h.to(compute_dtype)
        wc = w.to(compute_dtype)
        twc = tw.to(compute_dtype) if th is not None else None
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(w.shape, dtype=acc, device=w.device) if need_w else None
        total = torch.zeros((), dtype=acc, device=h.device)
        total_kl = torch.zeros((), dtype=acc, device=h.device)
        fn = _chunk_fn(h.device)
        for s in range(0, n, chunk):
            hc = hc_all[s: s + chunk]
            t_logits = th[s: s + chunk].to(compute_dtype) @ twc.t() if th is not None else None
            ce, kl, p = fn(hc @ wc.t(), targets[s: s + chunk], valid_all[s: s + chunk], inv_count, t_logits, kl_coef,
                           float(temp), need_h or need_w, acc, compute_dtype)
            total += ce
            if kl is not None:
                total_kl += kl
            if p is not None:
                if need_h:
                    grad_h[s: s + chunk] = (p @ wc).to(h.dtype)
                if need_w:
                    grad_w += (p.t() @ hc).to(acc)
            del p, t_logits
        ctx.save_for_backward(*(t for t in (grad_h, grad_w) if t is not None))
        ctx.has = (need_h, need_w)
        loss = total / count
        if th is not None:
            loss = loss + kl_weight * temp * temp * total_kl / max(n, 1)
        return loss

    @staticmethod
    def backward(ctx, g):
        saved = list(ctx.saved_tensors)
        need_h, need_w = ctx.has
        gh = saved.pop(0) * g if need_h else None
        gw = saved.pop(0) * g if need_w else None
        return gh, gw, None, None, None, None, None, None, None


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    return torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype


def linear_cross_entropy(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Mean cross-entropy of ``h @ w.T`` (h: (n, d), w: (V, d)) against ``targets`` (n,), -100 = ignored.
    Matmuls run in the autocast dtype when autocast is on, else in h's dtype; softmax and sums in fp32."""
    cd = _compute_dtype(h)
    with torch.autocast(h.device.type, enabled=False):
        return _LinearCE.apply(h, w, targets, chunk, cd)


def linear_ce_distill(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, th: torch.Tensor, tw: torch.Tensor,
                      weight: float, temp: float = 1.0, chunk: int = 2048) -> torch.Tensor:
    """``linear_cross_entropy(h, w, targets) + weight * temp^2 * mean over rows of KL(softmax(th @ tw.T / temp) ||
    softmax(h @ w.T / temp))``: the distillation loss of ``Trainer`` without the student's or the teacher's full
    logits (th, tw: the teacher's hidden states and head, no gradient)."""
    cd = _compute_dtype(h)
    with torch.autocast(h.device.type, enabled=False):
        return _LinearCE.apply(h, w, targets, chunk, cd, th.detach(), tw.detach(), float(weight), float(temp))


def _plain_head(model) -> bool:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return False
    cfg = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling"):
        if getattr(cfg, attr, None) not in (None, 0, 1, 1.0):
            return False
    return getattr(model, "base_model", None) is not None and model.base_model is not model


def lm_loss(model, ids: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Next-token loss of a causal LM on ``ids`` (batch, seq): the fused path where the model allows it."""
    if _plain_head(model):
        h = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
        d = h.shape[-1]
        return linear_cross_entropy(h[:, :-1].reshape(-1, d), model.get_output_embeddings().weight,
                                    ids[:, 1:].reshape(-1), chunk)
    logits = model(input_ids=ids, use_cache=False).logits
    v = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, v).float(), ids[:, 1:].reshape(-1))


def lm_distill_loss(model, teacher, ids: torch.Tensor, weight: float, temp: float,
                    chunk: int = 2048) -> torch.Tensor | None:
    """CE + weight * temp^2 * KL(teacher || student) on ``ids`` through ``linear_ce_distill`` when both models are a
    plain backbone + linear head; None otherwise (the caller then computes the logits)."""
    if not (_plain_head(model) and _plain_head(teacher)):
        return None
    h = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
    with torch.no_grad():
        ht = teacher.base_model(input_ids=ids, use_cache=False).last_hidden_state
    d, dt = h.shape[-1], ht.shape[-1]
    return linear_ce_distill(h[:, :-1].reshape(-1, d), model.get_output_embeddings().weight, ids[:, 1:].reshape(-1),
                             ht[:, :-1].reshape(-1, dt), teacher.get_output_embeddings().weight, weight, temp, chunk)


def compile_blocks(model, **kw) -> int:
    """``torch.compile`` each decoder block in place (regional compilation: identical blocks share one
    compiled graph, so compile time does not grow with depth).  Returns the number of blocks compiled."""
    import torch._dynamo
    from ..nn import find_blocks
    # one graph per (binarizer kind, grad mode, block layout): a run switches kind for its evaluations and the
    # hard-sign phase, and `compare` trains several methods in one process; past the default limit of 8, dynamo
    # silently runs the blocks eagerly (seen: half the tokens/s for the later methods of a compare)
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), 64))
    _, blocks = find_blocks(model)
    for b in blocks:
        b.compile(**kw)
    return len(blocks)
