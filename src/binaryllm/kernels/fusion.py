"""torch.compile graph passes that move the small elementwise work around packed layers into their kernels.

Why: in a compiled batch-1 decode step every packed layer is one opaque custom op (``kernels/ops.py``), so inductor
cannot fuse the small elementwise work around it into it, and each such piece costs a kernel launch of its own
(on the H100 about 1-2 us each in a Llama-7B step of 1.35-1.45 ms; docs/RESULTS.md).  ``FusePackedLinear`` is an
inductor post-grad pass (``decode.compile_options`` installs it) that runs four rewrites, each found by dataflow
only (no module or model names):

**Gating** (``fuse_glu``).  ``nn/fuse.py`` stacks a block's gate and up projections into one packed layer whose
``mma`` tiles pair the rows (``tile_pairs``: each thread of the kernel's epilogue holds gate row j and up row j),
so the kernel can write silu(gate) * up itself (``mma_w1a16``: GATED) instead of [gate | up].  It finds

    y = binaryllm::w1a16(x, words, row_scale, K, input_scale, bias, tiles, P)      # 2 P columns, paired tiles
    h = silu(y[..., :P]) * y[..., P:]                                                # split or sliced

where nothing else reads y or the pieces between, and replaces both with ``h = binaryllm::w1a16_gated(x, words,
row_scale, K, input_scale, bias, tiles, P)``.  The silu may appear as ``aten.silu`` or as inductor's decomposition
(fp32 ``c / (1 + exp(-c))`` or ``c * sigmoid(c)``, rounded back to y's dtype).  Anything else is left as it is:
unpaired or missing tiles, [up | gate] order, other uses of y.  The gated op rounds like eager PyTorch (y, then
silu, then the product, each to y's dtype), so its output matches the unfused graph up to those roundings.

(A first version made silu(gate) * up in the *down* projection's kernel as it read its input instead: every
program of that kernel then gated the whole row again, and the H100 decode step got slower, Llama-7B shape 1457 ->
1759 us, SmolLM2 549 -> 564 us; docs/RESULTS.md, fourteenth session.)

**Residual add + RMSNorm** (``fuse_norm``).  Between two packed layers a block has

    h = r + binaryllm::w1a16(a, ...)                  # the o (down) projection and the residual stream
    y = binaryllm::w1a16(RMSNorm(h) * weight, ...)    # q/k/v (gate/up, or the w1a16_gated above)

with RMSNorm as transformers' Llama-style modules write it (fp32 mean of squares, rsqrt, rounded to h's dtype, then
the weight).  RMSNorm needs the whole row of h before any of it can be used, so it cannot be made by one program
of either kernel alone.  The first kernel's epilogue (``binaryllm::w1a16_res``) adds the residual and writes each
program's sum of h^2 over its rows; the second (``binaryllm::w1a16_norm``) adds those few partial sums up in every
program, and normalizes h as it copies it to shared memory (one row only: the XS path of ``mma_w1a16``).  One
fused add + RMSNorm kernel fewer between them.  The residual stream h is exact; the normed x can differ from
eager in its last bit (the order of the sum of squares, the kernel's rsqrt.approx).  The decoder's final RMSNorm
before the lm_head's one-row GEMV (``binaryllm::dense_gemv``, ``kernels/dense.py``) is rewritten the same way: the
last block's down projection becomes ``w1a16_res`` and the lm_head ``binaryllm::dense_gemv_norm``.  Left alone: more
than one row, an input scale on the second layer, a first layer whose output is read elsewhere, other norms (Gemma's
1 + weight, an fp32 weight), layers without ``mma`` tiles.

**Rotary angles** (``fuse_outer``, with ``fuse_rope``).  The rotary embedding's angles are a matmul of the
inverse frequencies (B, D/2, 1) by the positions (B, 1, T): with one column, a broadcast product, which the pass
writes as one (``aten.mul``) so that inductor makes it inside the cos/sin kernel instead of launching a GEMM.

**Rotary embedding + cache writes** (``fuse_rope``).  In a one-token step each attention layer has

    q, k = rope(q_pre), rope(k_pre)                    # rotate half: x cos + rotate_half(x) sin
    K = index_put(k_cache, [:, :, pos], k); V = index_put(v_cache, [:, :, pos], v)     # functionalized index_copy_
    o = binaryllm::decode_attention(q, K, V, mask, scale)

with the caches graph inputs (copied back at the end of the graph).  Inductor made the rotary embedding and both
writes one kernel before the attention.  The pass gives ``binaryllm::decode_attention_rope(q_pre, k_pre, v, cos,
sin, k_cache, v_cache, pos, mask, scale)`` instead, which mutates the caches itself (the copies back are erased):
the attention kernel makes the rotation in fp32 and rounds once, as inductor's kernel did (so the caches are bit
for bit the same), writes the token's row, and since every other row of the cache was written by an earlier step,
loads its first block of keys and values before its PDL wait (``kernels/attention.py``).  Not packed-specific: the
bf16 step gets it too.  Left alone: another rotation, a cache read elsewhere, a cache that is not a graph input.
"""
from __future__ import annotations

import operator

import torch
import torch.fx

aten = torch.ops.aten
prims = torch.ops.prims

# fuse_norm also takes the final RMSNorm into the lm_head's dense GEMV (``dense_gemv_norm``); off: it is left to
# inductor.  Off from 943dfe9 to the twenty-ninth session: with it on, the packed Llama-7B step's compile on the H100
# did not finish in 460 s (twenty-seventh session).  The cause, found on the CPU under torch 2.11: inductor formatted
# the implicit fallback's log line for dense_gemv_norm, first met behind the whole network, and that string doubles
# a layer; decode.compile_options now registers the ops' lowerings first (kernels/ops.register_lowerings).  On the
# H100 (twenty-ninth session) that compile then took 18.6 s, and the 7B step 1039.9 us against 1041.6 off, the same
# tokens (docs/RESULTS.md).  The A/B knob for bench/decode_step.py consts is fusion.LM_HEAD_NORM=0
LM_HEAD_NORM = True


def _is(node, *targets) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in targets


def _val(node):
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _has_tiles(node) -> bool:
    """A packed op node called with the mma tile layout (argument 6)."""
    return len(node.args) >= 7 and node.args[6] is not None


def _keep_meta(new: torch.fx.Node, old: torch.fx.Node) -> None:
    """``new`` takes ``old``'s place: its fake value and where it came from (not the old op's recorded inputs)."""
    new.meta.update({k: v for k, v in old.meta.items() if k in ("val", "stack_trace", "nn_module_stack")})


def _silu_core(node):
    """c where ``node`` is silu(c): ``aten.silu(c)``, ``c / (1 + exp(-c))`` or ``c * sigmoid(c)``; else None."""
    if _is(node, aten.silu.default):
        return node.args[0]
    if _is(node, aten.div.Tensor):
        c, den = node.args[:2]
        if _is(den, aten.add.Tensor):
            for e, one in (den.args[:2], den.args[1::-1]):
                if one == 1 and _is(e, aten.exp.default) and _is(e.args[0], aten.neg.default) \
                        and e.args[0].args[0] is c:
                    return c
    if _is(node, aten.mul.Tensor):
        a, b = node.args[:2]
        for c, s in ((a, b), (b, a)):
            if _is(s, aten.sigmoid.default) and s.args[0] is c:
                return c
    return None


def _silu_input(node):
    """g where ``node`` is silu(g) in g's own dtype, computed directly or in fp32 and rounded back; else None."""
    if _is(node, aten.silu.default):
        return node.args[0]
    if _is(node, prims.convert_element_type.default):
        c = _silu_core(node.args[0])
        if _is(c, prims.convert_element_type.default) and c.args[1] == torch.float32:
            g = c.args[0]
            if _val(g) is not None and _val(g).dtype == node.args[1]:
                return g
    return None


def _columns(node):
    """(source, start, stop) where ``node`` is columns [start, stop) of the last dimension of ``source``."""
    if _is(node, operator.getitem) and _is(node.args[0], aten.split_with_sizes.default, aten.split.Tensor):
        sp = node.args[0]
        src, size = sp.args[0], sp.args[1]
        dim = sp.args[2] if len(sp.args) > 2 else sp.kwargs.get("dim", 0)
        v = _val(src)
        if v is None or dim not in (-1, v.dim() - 1):
            return None
        n = v.shape[-1]
        sizes = list(size) if isinstance(size, (list, tuple)) else [size] * (-(-n // size))
        i = node.args[1]
        start = sum(sizes[:i])
        return src, start, min(start + sizes[i], n)
    if _is(node, aten.slice.Tensor):
        args = list(node.args) + [0, None, None, 1][len(node.args) - 1:]
        src, dim, start, end, step = args[:5]
        v = _val(src)
        if v is None or step != 1 or dim not in (-1, v.dim() - 1):
            return None
        n = v.shape[-1]
        start = 0 if start is None else (start + n if start < 0 else start)
        end = n if end is None else min(end + n if end < 0 else end, n)
        return src, start, end
    return None


def _erase_dead(node) -> None:
    """Erase ``node`` and, recursively, the inputs it was the last user of (pure nodes only)."""
    if not isinstance(node, torch.fx.Node) or node.users or node.op != "call_function" or node.is_impure():
        return
    inputs = list(node.all_input_nodes)
    node.graph.erase_node(node)
    for n in inputs:
        _erase_dead(n)


def _reach(node: torch.fx.Node, step, limit: int = 12) -> set:
    """Nodes reachable from ``node`` by ``step`` (inputs or users), up to ``limit`` steps (matched chains are
    short)."""
    seen, frontier = set(), [node]
    for _ in range(limit):
        frontier = [m for n in frontier for m in step(n) if m not in seen]
        seen.update(frontier)
        if not frontier:
            break
    return seen


def _private_chain(src: torch.fx.Node, dst: torch.fx.Node) -> bool:
    """Whether ``src`` and every node between it and ``dst`` are used only inside that chain: then replacing
    ``dst`` leaves them all dead."""
    chain = {src} | (_reach(src, lambda n: n.users) & _reach(dst, lambda n: n.all_input_nodes))
    return all(set(n.users) <= chain | {dst} for n in chain)


def _pairs_arg(node: torch.fx.Node):
    if len(node.args) > 7:
        return node.args[7]
    return node.kwargs.get("pairs", 0)


def fuse_glu(graph: torch.fx.Graph) -> int:
    """Rewrite every gating match (see the module docstring) in ``graph``; returns how many."""
    from . import ops  # noqa: F401  (registers the binaryllm ops)
    w1a16 = torch.ops.binaryllm.w1a16.default
    gated = torch.ops.binaryllm.w1a16_gated.default
    done = 0
    for node in list(graph.nodes):
        if not _is(node, aten.mul.Tensor) or _val(node) is None:
            continue
        for a, b in (node.args[:2], node.args[1::-1]):
            g = _silu_input(a)
            cg, cu = _columns(g), _columns(b)
            if g is None or cg is None or cu is None or cg[0] is not cu[0] or not _is(cg[0], w1a16):
                continue
            y = cg[0]
            P = _pairs_arg(y)
            if not P or not _has_tiles(y) or cg[1:] != (0, P) or cu[1:] != (P, 2 * P) \
                    or _val(y).shape[-1] != 2 * P or not _private_chain(y, node):
                continue
            with graph.inserting_before(node):
                new = graph.call_function(gated, (*y.args[:7], P))
            _keep_meta(new, node)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            for n in (a, b):
                _erase_dead(n)
            done += 1
            break
    return done


def _rms_norm(x):
    """(h, weight, eps) where ``x`` is transformers' Llama-style RMSNorm of h as ATen ops,
    ``weight * to(h.dtype)(f32(h) * rsqrt(mean(f32(h) ** 2, -1, keepdim) + eps))``; else None."""
    if not _is(x, aten.mul.Tensor) or _val(x) is None:
        return None
    for w, c in (x.args[:2], x.args[1::-1]):
        if not (_is(c, prims.convert_element_type.default) and _is(c.args[0], aten.mul.Tensor)):
            continue
        for cf, rs in (c.args[0].args[:2], c.args[0].args[1::-1]):
            if not (_is(cf, prims.convert_element_type.default) and cf.args[1] == torch.float32
                    and _is(rs, aten.rsqrt.default) and _is(rs.args[0], aten.add.Tensor)):
                continue
            for mean, eps in (rs.args[0].args[:2], rs.args[0].args[1::-1]):
                if not (_is(mean, aten.mean.dim) and isinstance(eps, (int, float))
                        and _is(mean.args[0], aten.pow.Tensor_Scalar) and mean.args[0].args[1] == 2):
                    continue
                sq = mean.args[0].args[0]           # f32(h) itself, or a second conversion of the same h
                if sq is not cf and not (_is(sq, prims.convert_element_type.default) and sq.args[0] is cf.args[0]
                                         and sq.args[1] == torch.float32):
                    continue
                h, hv, wv = cf.args[0], _val(cf.args[0]), _val(w)
                dims = list(mean.args[1])
                keep = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
                if hv is None or wv is None or dims not in ([-1], [hv.dim() - 1]) or not keep \
                        or hv.dtype != c.args[1] or wv.dtype != hv.dtype or tuple(wv.shape) != (hv.shape[-1],):
                    continue
                return h, w, float(eps)
    return None


def _through_noop_slices(x):
    """x, or what it slices where its slices keep every element (``hidden[:, -0:]`` before an lm_head)."""
    while _is(x, aten.slice.Tensor) and _val(x) is not None and _val(x.args[0]) is not None \
            and _val(x).shape == _val(x.args[0]).shape:
        x = x.args[0]
    return x


def _fake(target, args):
    """The op's fake output for these (node) arguments, made in their fake mode."""
    vals = [_val(a) if isinstance(a, torch.fx.Node) else a for a in args]
    mode = next(v.fake_mode for v in vals if isinstance(v, torch.Tensor))
    with mode:
        return target(*vals)


def fuse_norm(graph: torch.fx.Graph) -> int:
    """Rewrite every match of ``h = r + w1a16(...)`` followed by ``w1a16(RMSNorm(h))`` (or ``w1a16_gated``), one
    row, mma tiles on both, no input scale on the second: the first becomes ``w1a16_res`` (h and the partial sums
    of h^2), the second ``w1a16_norm`` (the norm made as its kernel reads h); a ``dense_gemv(RMSNorm(h))`` second
    (the lm_head, through slices that keep every element) becomes ``dense_gemv_norm``.  Returns how many layers it
    rewrote (producers and consumers)."""
    from . import ops  # noqa: F401  (registers the binaryllm ops)
    b = torch.ops.binaryllm
    plain, gated, dense = b.w1a16.default, b.w1a16_gated.default, b.dense_gemv.default
    made: dict = {}                         # h of a w1a16_res -> its partial sums, for the other consumers
    done = 0
    for c in list(graph.nodes):
        is_dense = LM_HEAD_NORM and _is(c, dense) and _val(c.args[1]) is not None
        if not (is_dense or (_is(c, plain, gated) and _has_tiles(c) and c.args[4] is None)):
            continue
        x = _through_noop_slices(c.args[0])
        norm = _rms_norm(x)
        if norm is None:
            continue
        h, w, eps = norm
        K = _val(c.args[1]).shape[1] if is_dense else c.args[3]
        if h not in made:
            if not _is(h, aten.add.Tensor) or _val(h) is None or _val(h).numel() != K:
                continue
            for y, r in (h.args[:2], h.args[1::-1]):
                if _is(y, plain) and _has_tiles(y) and not _pairs_arg(y) \
                        and list(y.users) == [h] and isinstance(r, torch.fx.Node) and _val(r) is not None \
                        and _val(r).shape == _val(h).shape \
                        and _val(r).dtype == _val(y).dtype == _val(h).dtype:      # the kernel stores h as y
                    break
            else:
                continue
            args = (*y.args[:7], r)
            with graph.inserting_before(h):
                res = graph.call_function(b.w1a16_res.default, args)
                res.meta["val"] = _fake(b.w1a16_res.default, args)
                hn = graph.call_function(operator.getitem, (res, 0))
                part = graph.call_function(operator.getitem, (res, 1))
            _keep_meta(hn, h)
            part.meta["val"] = res.meta["val"][1]
            h.replace_all_uses_with(hn)
            graph.erase_node(h)
            _erase_dead(y)
            made[hn] = part
            h = hn                          # later consumers of the same norm read hn now
            done += 1
        part = made[h]
        is_gated = c.target is gated
        with graph.inserting_before(c):
            if is_dense:                    # the final RMSNorm into the lm_head's GEMV
                new = graph.call_function(b.dense_gemv_norm.default, (h, part, w, eps, c.args[1]))
            else:
                P = c.args[7] if is_gated else _pairs_arg(c)
                new = graph.call_function(b.w1a16_norm.default, (h, part, w, eps, c.args[1], c.args[2], K,
                                                                 c.args[5], c.args[6], P, is_gated))
        _keep_meta(new, c)
        x = c.args[0]
        c.replace_all_uses_with(new)
        graph.erase_node(c)
        _erase_dead(x)
        done += 1
    return done


def _rope_of(node):
    """(x, cos, sin) where ``node`` is transformers' rotate-half rotary embedding of x (B, H, T, D) as ATen ops,
    ``x * cos + cat([-x[..., D/2:], x[..., :D/2]], -1) * sin`` (either order of each product and of the sum); else
    None."""
    if not _is(node, aten.add.Tensor):
        return None
    for m1, m2 in (node.args[:2], node.args[1::-1]):
        if not (_is(m1, aten.mul.Tensor) and _is(m2, aten.mul.Tensor)):
            continue
        for cat, sin in (m2.args[:2], m2.args[1::-1]):
            if not (_is(cat, aten.cat.default) and len(cat.args[0]) == 2):
                continue
            dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
            neg, lo = cat.args[0]
            if not _is(neg, aten.neg.default):
                continue
            hi, clo = _columns(neg.args[0]), _columns(lo)
            if hi is None or clo is None or hi[0] is not clo[0]:
                continue
            x, xv = hi[0], _val(hi[0])
            if xv is None or dim not in (-1, xv.dim() - 1):
                continue
            D = xv.shape[-1]
            if D % 2 or hi[1:] != (D // 2, D) or clo[1:] != (0, D // 2):
                continue
            for a, cos in (m1.args[:2], m1.args[1::-1]):
                if a is x and isinstance(cos, torch.fx.Node) and isinstance(sin, torch.fx.Node):
                    return x, cos, sin
    return None


def _cache_write(node, pos=None):
    """(cache, pos, value, the copy back) where ``node`` is ``index_put(cache, [None, None, pos], value)`` into a
    graph input (the functionalized ``cache.index_copy_(2, pos, value)`` of a one-token step), read only by one
    other node (the attention) and the copy back into the input; else None.  ``pos``: the position node it must
    use."""
    if not (_is(node, aten.index_put.default) and len(node.args) >= 3 and not (node.args[3:4] or [False])[0]):
        return None
    cache, idx, value = node.args[:3]
    if not (isinstance(cache, torch.fx.Node) and cache.op == "placeholder" and len(idx) == 3
            and idx[0] is None and idx[1] is None and isinstance(idx[2], torch.fx.Node)):
        return None
    p = idx[2]
    if (pos is not None and p is not pos) or _val(p) is None or _val(p).numel() != 1:
        return None
    copies = [u for u in node.users if _is(u, aten.copy_.default) and u.args[0] is cache and u.args[1] is node]
    if len(copies) != 1 or len(node.users) != 2 or set(cache.users) != {node, copies[0]}:
        return None                     # (nothing else may read the cache before or after the write either)
    return cache, p, value, copies[0]


def fuse_rope(graph: torch.fx.Graph) -> int:
    """Rewrite every ``binaryllm::decode_attention`` whose query is the rotary embedding of q, whose keys are the
    cache with the roped key of the token written at its position, and whose values the cache with the token's value
    written there, into one ``binaryllm::decode_attention_rope`` that makes the rotary embedding and both cache
    writes in the attention kernel (which mutates the caches).  Returns how many."""
    from . import ops  # noqa: F401  (registers the binaryllm ops)
    att, fused = torch.ops.binaryllm.decode_attention.default, torch.ops.binaryllm.decode_attention_rope.default
    done = 0
    for a in list(graph.nodes):
        if not _is(a, att) or len(a.args) < 5:
            continue
        q, k, v, mask, scale = a.args[:5]
        kw = _cache_write(k)
        vw = _cache_write(v, kw[1] if kw else None)
        rq = _rope_of(q)
        rk = _rope_of(kw[2]) if kw else None
        if kw is None or vw is None or rq is None or rk is None or rq[1:] != rk[1:]:
            continue
        (xq, cos, sin), xk = rq, rk[0]
        vals = [_val(n) for n in (xq, xk, vw[2], kw[0], vw[0], q, cos, sin)]
        if any(t is None for t in vals):
            continue
        vq, vk, vv, kc, vc, vqr, vcos, vsin = vals
        B, D = vq.shape[0], vq.shape[-1]
        dt = vq.dtype
        if not (vq.dim() == vk.dim() == vv.dim() == 4 and vq.shape[2] == vk.shape[2] == vv.shape[2] == 1
                and vk.shape == vv.shape and kc.shape == vc.shape and vk.shape[:2] == kc.shape[:2]
                and kc.shape[3] == D and vk.shape[3] == D and vqr.dtype == dt
                and all(t.dtype == dt for t in (vk, vv, kc, vc)) and _val(kw[2]).dtype == dt
                and all(t.dim() == 4 and t.shape[1:] == (1, 1, D) and t.shape[0] in (1, B) for t in (vcos, vsin))):
            continue
        with graph.inserting_before(a):
            new = graph.call_function(fused, (xq, xk, vw[2], cos, sin, kw[0], vw[0], kw[1], mask, scale))
        _keep_meta(new, a)
        a.replace_all_uses_with(new)
        graph.erase_node(a)
        for w in (kw, vw):
            graph.erase_node(w[3])          # the copy back: the kernel writes the cache itself
        for n in (q, k, v):
            _erase_dead(n)
        done += 1
    return done


def fuse_outer(graph: torch.fx.Graph) -> int:
    """``mm``/``bmm`` of a one-column matrix by a one-row one (the rotary embedding's angles: inverse frequencies
    (B, D/2, 1) @ positions (B, 1, T)) as the broadcast product it is, which inductor then makes inside the cos/sin
    kernel: a one-token step ran it as a cuBLAS/CUTLASS GEMM of its own (3.4 us on the H100, Llama-7B shape).
    Exact: with one column each output element is one product, rounded once either way."""
    done = 0
    for n in list(graph.nodes):
        if not _is(n, aten.mm.default, aten.bmm.default):
            continue
        a, b = n.args[:2]
        va, vb, vo = _val(a), _val(b), _val(n)
        if va is None or vb is None or vo is None or va.shape[-1] != 1 or va.dtype != vb.dtype \
                or vo.dtype != va.dtype:
            continue
        with graph.inserting_before(n):
            m = graph.call_function(aten.mul.Tensor, (a, b))
        _keep_meta(m, n)
        n.replace_all_uses_with(m)
        graph.erase_node(n)
        done += 1
    return done


def _pass_base():
    try:
        from torch._inductor.custom_graph_pass import CustomGraphPass
        return CustomGraphPass
    except ImportError:  # an older torch: a plain callable (no FX graph caching of the pass)
        return object


class FusePackedLinear(_pass_base()):
    """The post-grad pass (``torch._inductor.config.post_grad_custom_post_pass``): ``fuse_glu`` with ``glu``,
    then ``fuse_norm`` with ``norm``, then ``fuse_rope`` with ``rope`` and ``fuse_outer`` with ``rope`` and
    ``outer``.  ``rewrites`` counts the matches over every graph it saw, ``counts`` by rewrite (a graph inductor
    takes from its cache is not seen again)."""

    def __init__(self, glu: bool = True, norm: bool = True, rope: bool = True, outer: bool = True):
        self.glu, self.norm, self.rope, self.outer = glu, norm, rope, outer
        self.counts = {"glu": 0, "norm": 0, "rope": 0, "outer": 0}

    @property
    def rewrites(self) -> int:
        return sum(self.counts.values())

    def __call__(self, graph: torch.fx.Graph) -> None:
        if self.glu:
            self.counts["glu"] += fuse_glu(graph)
        if self.norm:
            self.counts["norm"] += fuse_norm(graph)
        if self.rope:
            self.counts["rope"] += fuse_rope(graph)
            if self.outer:
                self.counts["outer"] += fuse_outer(graph)

    def uuid(self):
        # part of inductor's cache key: a compiled graph from a different version of this pass (or other
        # switches) is not reused
        from torch._inductor.custom_graph_pass import get_hash_for_files
        switches = (self.glu, self.norm, self.rope, self.outer, LM_HEAD_NORM)
        return get_hash_for_files((__file__,)) + ("-" + "".join(str(int(v)) for v in switches)).encode()
