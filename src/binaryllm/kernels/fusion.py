"""A torch.compile graph pass that moves a gated MLP's activation into the packed gate/up projection's kernel.

Why: in a compiled batch-1 decode step every packed layer is one opaque custom op (``kernels/ops.py``), so inductor
cannot fuse the small elementwise work around it into it, and each such piece costs a kernel launch of its own (on
the H100 about 2 us a layer, of a Llama-7B step's 1.35 ms, for ``silu(gate) * up`` alone; docs/RESULTS.md).
``nn/fuse.py`` stacks a block's gate and up projections into one packed layer whose ``mma`` tiles pair the rows
(``tile_pairs``: each thread of the kernel's epilogue holds gate row j and up row j), so the kernel can write
silu(gate) * up itself (``mma_w1a16``: GATED) instead of [gate | up].

``GluIntoPackedLinear`` is an inductor post-grad pass (``decode.compile_options`` installs it).  It finds, by
dataflow only (no module or model names),

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
"""
from __future__ import annotations

import operator

import torch
import torch.fx

aten = torch.ops.aten
prims = torch.ops.prims


def _is(node, *targets) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in targets


def _val(node):
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


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
    """Rewrite every match (see the module docstring) in ``graph``; returns how many."""
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
            if not P or len(y.args) < 7 or y.args[6] is None or cg[1:] != (0, P) or cu[1:] != (P, 2 * P) \
                    or _val(y).shape[-1] != 2 * P or not _private_chain(y, node):
                continue
            with graph.inserting_before(node):
                new = graph.call_function(gated, (*y.args[:7], P))
            # the output's fake value and where it came from; not the old ops' recorded input values
            new.meta.update({k: v for k, v in node.meta.items() if k in ("val", "stack_trace", "nn_module_stack")})
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            for n in (a, b):
                _erase_dead(n)
            done += 1
            break
    return done


def _pass_base():
    try:
        from torch._inductor.custom_graph_pass import CustomGraphPass
        return CustomGraphPass
    except ImportError:  # an older torch: a plain callable (no FX graph caching of the pass)
        return object


class GluIntoPackedLinear(_pass_base()):
    """The post-grad pass (``torch._inductor.config.post_grad_custom_post_pass``); ``rewrites`` counts the ops it
    replaced over every graph it saw (a graph inductor takes from its cache is not seen again)."""

    def __init__(self):
        self.rewrites = 0

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.rewrites += fuse_glu(graph)

    def uuid(self):
        # part of inductor's cache key: a compiled graph from a different version of this pass is not reused
        from torch._inductor.custom_graph_pass import get_hash_for_files
        return get_hash_for_files((__file__,))
