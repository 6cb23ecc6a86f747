"""Fast token-by-token decoding: a static KV cache and, on CUDA, the one-token step captured by hand as a CUDA graph.

Why: a packed 30-layer model launches ~210 small 1-bit kernels per token, and from Python each launch costs tens of
microseconds, more than the kernel itself at batch 1.  transformers' ``generate`` with a static cache relies on
torch.compile ("reduce-overhead") to remove that cost, which compiles for minutes around custom Triton kernels.
Here the step is captured once with ``torch.cuda.graph`` (no compiler): every later token is one graph replay.

The step reads two static device buffers (the token ids and the cache position), so replays need no host sync; the
only sync is the one the caller asks for (streaming text, an end-of-sequence check).  transformers' ``StaticLayer``
(5.x) writes new keys at its own device counter (``cumulative_length``), not at ``cache_position``, and advances it
on every forward: the step first sets every such counter to the position, so the warm-up runs before the capture
(and any replay) write exactly where the position says.  Plain ``StaticLayer`` layers (not sliding-window ones)
instead get a one-token ``update`` for the step that writes at the position buffer itself and advances nothing:
each counter's advance was a kernel of its own in the compiled step (32 kernels a Llama-7B step); the counters
are still set before the step (transformers' mask reads them).  The prefill keeps transformers' own ``update``.  Works for any Hugging Face
causal LM whose forward accepts ``cache_position`` with a ``StaticCache`` (Llama, Mistral, Qwen2/3, ...).  On the CPU
the same code runs the step eagerly (no graph).
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from .errors import BinaryLLMError


def compile_options(tune: bool = False, glu: bool = True, norm: bool = True, rope: bool = True,
                    outer: bool = True) -> dict:
    """torch.compile options of the one-token step, each only where this torch has the switch:

    * programmatic dependent launch (``triton.enable_pdl``) in the kernels inductor generates.  Inductor emits it
      only for CUDA devices of compute capability >= 9 and adds the waits a kernel needs before it reads what the
      kernel before it wrote; each kernel may then start while the one before it ends.  The packed layers'
      ``mma`` kernel does the same (kernels/mma_w1a16.py), and it only pays when its neighbours take part.  On
      the H100, Llama-7B shape, same process: packed 536 -> 603 tokens/s, bf16 160 -> 168.
    * combo kernels (``combo_kernels``): independent small kernels of a layer (the rotary embedding of q and k,
      the two cache writes, ...) launched as one.  On the H100, SmolLM2-135M shape, three same-process A/B
      pairs: packed 1091-1169 -> 1343-1392 tokens/s, bf16 663-784 -> 694-780; Llama-7B shape: no change
      (641 -> 633 packed, 167 -> 164 bf16, within run-to-run spread).

    * with ``glu`` (default), the graph pass ``kernels/fusion.py``: a gated MLP's ``silu(gate) * up`` is made in
      the packed gate/up kernel's epilogue, one elementwise kernel a layer fewer (on the H100: SmolLM2 step 548 ->
      507 us, Llama-7B 1453 -> 1434 us).
    * with ``norm`` (default), the same pass also makes each residual add + RMSNorm between two packed layers in
      their kernels (the add in the first one's epilogue, the norm as the second reads its input), two kernels a
      block fewer (on the H100, same process: SmolLM2 step 509 -> 483 us, Llama-7B 1443 -> 1386 us).
    * with ``rope`` (default), the rotary embedding of q and k and both cache writes are made in the decode
      attention kernel (``fuse_rope``), one kernel a layer fewer, and the attention loads the cache before its PDL
      wait (on the H100, same process: packed SmolLM2 451.2 -> 415.1 us, Llama-7B 1340.4 -> 1268.0 us; bf16
      1198.1 -> 1181.3 and 6026.6 -> 5979.9 us).  With ``outer`` (default) also the rotary angles' one-column matmul
      as a product (``fuse_outer``), which inductor makes in the cos/sin kernel: one GEMM launch a step fewer.

    Set only with ``tune``: ``coordinate_descent_tuning``.  It makes the bf16 step much faster at SmolLM2's size
    (1091-1161 tokens/s; 1308-1460 with combo kernels), leaves the packed step where it is and compiles for minutes
    longer (docs/RESULTS.md); ``bench decode`` measures it as the path ``graph-compiled-tuned``.

    Making the options also gives inductor the binaryllm ops' fallback lowerings (``kernels/ops.register_lowerings``),
    so a compile of one's own with these options meets them as the decoder's does."""
    import torch._inductor.config as ic

    from .kernels.ops import register_lowerings
    register_lowerings()        # before inductor meets the packed ops (torch 2.11 compiled for minutes: its docstring)
    opts = {}
    if hasattr(ic.triton, "enable_pdl"):
        opts["triton.enable_pdl"] = True
    if hasattr(ic, "combo_kernels"):
        opts["combo_kernels"] = True
    if tune and hasattr(ic, "coordinate_descent_tuning"):
        opts["coordinate_descent_tuning"] = True
    if (glu or norm or rope) and hasattr(ic, "post_grad_custom_post_pass"):
        from .kernels.fusion import FusePackedLinear
        opts["post_grad_custom_post_pass"] = FusePackedLinear(glu, norm, rope, outer)
    return opts


def _set_decode_attention(model, on: bool) -> bool:
    """Switch ``model`` to the Triton decode attention (``on``, where Triton can run it) or back to SDPA; returns
    whether it uses the kernel now."""
    from .kernels import DECODE_ATTENTION
    uses = getattr(model.config, "_attn_implementation", None) == DECODE_ATTENTION
    if on and not uses:
        p = next(model.parameters())
        from .kernels import triton_usable
        if p.device.type != "cuda" or triton_usable(p.device.index or 0):
            try:
                import triton  # noqa: F401
            except ImportError:
                return False
            from .kernels.attention import use_decode_attention
            return use_decode_attention(model)
    elif not on and uses:
        model.set_attn_implementation("sdpa")
        return False
    return uses


def _set_dense_gemv(model, on: bool) -> bool:
    """Switch ``model``'s output embeddings to the Triton GEMV (``on``, where Triton can run it) or back."""
    try:
        from .kernels.dense import use_dense_gemv
    except ImportError:                   # no Triton: nothing was switched
        return False
    return use_dense_gemv(model, on)


class StaticDecoder:
    """``StaticDecoder(model, max_len).generate(prompt_ids, n)`` -> the n new token ids (batch, n).

    ``graph``: capture the decoding step as a CUDA graph (default: when the model is on a CUDA device).  The graph
    is captured at the first decoding step and replayed by every later one, across ``generate`` calls too.
    ``compile``: run the one-token forward through ``torch.compile`` (static shapes, ``compile_options``; with
    ``tune`` also coordinate descent tuning) first,
    which fuses the small norm / rope / activation kernels between the matmuls (packed layers stay single custom
    ops, ``kernels/ops.py``); on CUDA the compiled step is what the graph captures.  The prefill stays eager.
    ``fuse``: packed layers that read the same input (q/k/v, gate/up) run as one packed matmul
    (``nn/fuse.py``; the model is changed in place: ``binaryllm.nn.unfuse_projections`` before saving it).
    ``attention``: a model on transformers' ``sdpa`` attention runs its one-token steps through the Triton decode
    attention (``kernels/attention.py``; SDPA for the prefill; default: on CUDA where Triton runs).  The model
    keeps that setting (it is SDPA everywhere else); ``attention=False`` or ``model.set_attn_implementation("sdpa")``
    switches it back.  ``self.attention`` says whether the kernel is in use.
    ``gemv``: the model's output embeddings (the lm_head, full precision in a packed model too) run their one-row
    steps through the Triton GEMV ``kernels/dense.py`` instead of cuBLAS (default: on CUDA where Triton runs; the
    model keeps it, ``kernels.dense.use_dense_gemv(model, False)`` switches it back).  ``self.gemv`` says whether.
    ``chunk``: greedy decoding with CUDA graphs runs ``chunk`` steps per graph replay, the argmax of each step
    written on the device and fed back as the next step's input (``_greedy_steps``): no host work and no launch
    between the steps of a chunk; the host sees the tokens once a chunk (``on_token`` and the end-of-sequence check
    come in bursts of ``chunk``; steps after an end-of-sequence token in its chunk are computed and dropped).  The
    last steps of a generation that fill no whole chunk run one per replay.  Sampling (``temperature`` > 0) and
    the eager step (no graph) take one step at a time.
    ``pick``: on a GPU where Triton runs, a greedy step's argmax, the copies of its token and the position + 1 are
    one kernel (``kernels/pick.py``) instead of four; ``pick=False`` keeps ``torch.argmax`` and the copies.
    ``decode_seconds()``: how long the last ``generate`` took after its prefill (from its first token to its last,
    so the steps that made tokens 2..n), timed on the device's stream with CUDA events on a GPU (the host's time
    on the CPU); None after a generation of one token.
    """

    def __init__(self, model, max_len: int, batch: int = 1, graph: bool | None = None, compile: bool = False,
                 fuse: bool = True, attention: bool | None = None, tune: bool = False, gemv: bool | None = None,
                 chunk: int = 8, pick: bool = True):
        from transformers import StaticCache
        if chunk < 1:
            raise BinaryLLMError(f"chunk={chunk}: the greedy steps per graph replay must be at least 1")
        self.fused = []
        if fuse:
            from .nn.fuse import fuse_projections
            self.fused = fuse_projections(model)
        self.model = model.eval()
        p = next(model.parameters())
        self.device = p.device
        self.attention = _set_decode_attention(model, self.device.type == "cuda" if attention is None else attention)
        self.gemv = _set_dense_gemv(model, self.device.type == "cuda" if gemv is None else gemv)
        if self.device.type == "cuda":     # kernel layouts made before any capture or compile (nn/packed.py)
            from .nn.packed import prepare_kernels
            prepare_kernels(model)
        self.graph = (self.device.type == "cuda") if graph is None else graph
        if self.graph and self.device.type != "cuda":
            raise BinaryLLMError("CUDA graphs need the model on a CUDA device; pass graph=False on the CPU")
        self.max_len, self.batch = max_len, batch
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.chunk = chunk
        self._decode_marks = None       # (start, end) of the last generation's steps: see decode_seconds
        self.picked = torch.zeros(batch, chunk, dtype=torch.long, device=self.device)   # a chunk's greedy tokens
        self._pick = None        # the slots of the one-kernel argmax + feedback (kernels/pick.py), on a GPU
        if self.device.type == "cuda" and pick:
            from .kernels import triton_usable
            if triton_usable(self.device.index or 0):
                from .kernels.pick import scratch
                self._pick = scratch(batch, self.device)
        self.out: torch.Tensor | None = None
        self._stepping = False
        self._graph: torch.cuda.CUDAGraph | None = None           # the plain step (``step``)
        self._greedy: dict[int, torch.cuda.CUDAGraph] = {}        # k greedy steps (``_greedy_steps(k)``)
        self.compile_options = compile_options(tune) if compile else None
        self._step_forward = torch.compile(self._forward, dynamic=False, options=self.compile_options) if compile \
            else self._forward

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, past_key_values=self.cache, cache_position=pos, use_cache=True,
                         position_ids=pos.unsqueeze(0).expand(ids.shape[0], -1))
        return out.logits[:, -1, :]

    def _counters(self) -> list[torch.Tensor]:
        layers = getattr(self.cache, "layers", [])     # the mask reads them (the query offset): set them all
        return [c for c in (getattr(lay, "cumulative_length", None) for lay in layers) if isinstance(c, torch.Tensor)]

    def _step_updates(self) -> int:
        """Give every initialized plain ``StaticLayer`` of the cache a step ``update`` that writes the token's keys and
        values at ``self.pos`` and leaves ``cumulative_length`` alone (see the module docstring); returns how many
        layers have one.  Other calls (the prefill, more than one token) go to transformers' own ``update``."""
        try:
            from transformers.cache_utils import StaticLayer
        except ImportError:
            return 0
        n = 0
        for lay in getattr(self.cache, "layers", []):
            if "update" in vars(lay):
                n += 1
            elif type(lay) is StaticLayer and getattr(lay, "is_initialized", False) \
                    and all(isinstance(getattr(lay, a, None), torch.Tensor) for a in ("keys", "values")):
                lay.update = self._one_token_update(lay)
                n += 1
        return n

    def _one_token_update(self, lay) -> Callable:
        own = type(lay).update.__get__(lay)

        def update(key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self._stepping or key_states.shape[-2] != 1:
                return own(key_states, value_states, *args, **kwargs)
            lay.keys.index_copy_(2, self.pos, key_states)
            lay.values.index_copy_(2, self.pos, value_states)
            return lay.keys, lay.values
        return update

    def _step(self, keep: bool = True) -> torch.Tensor:
        """One step's forward from ``self.ids`` at ``self.pos``; returns its logits (copied into ``self.out`` with
        ``keep``, else the forward's own buffer, static only inside a captured graph)."""
        self._step_updates()
        counters = self._counters()       # allocated with the cache, at the prefill: same tensors for every step
        if counters:
            torch._foreach_copy_(counters, [self.pos[0]] * len(counters))
        self._stepping = True
        try:
            logits = self._step_forward(self.ids, self.pos)
        finally:
            self._stepping = False
        if not keep:
            return logits
        if self.out is None:
            self.out = torch.empty_like(logits)
        self.out.copy_(logits)
        return self.out

    def _advance(self, toks: torch.Tensor) -> None:
        """Feed the tokens (batch, 1) just picked back as the next step's input, one position on."""
        self.ids.copy_(toks)
        self.pos.add_(1)

    def _greedy_steps(self, k: int) -> None:
        """k greedy steps without the host: step j picks the argmax of its logits into ``picked[:, j]`` and feeds it
        back (``_advance``); on a GPU where Triton runs, all of that after the logits is one kernel
        (``kernels/pick.py``)."""
        for j in range(k):
            logits = self._step(keep=self._pick is None or j == k - 1)    # the last step's in ``self.out``, always
            if self._pick is not None and self._pick_feed(logits, j):
                continue
            nxt = logits.argmax(-1)
            self.picked[:, j].copy_(nxt)
            self._advance(nxt[:, None])

    def _pick_feed(self, logits: torch.Tensor, j: int) -> bool:
        """The one-kernel pick of step j (``kernels/pick.py``); if the kernel fails to build or run here, False
        and ``torch.argmax`` with the copies from then on, said once."""
        from .kernels.pick import pick_feed
        try:
            pick_feed(logits, self.picked[:, j], self.ids, self.pos, self._pick)
            return True
        except Exception as err:  # e.g. a Triton that cannot build it for this GPU
            from .kernels import warn_once
            self._pick = None
            warn_once("pick-failed", f"the Triton greedy pick failed ({type(err).__name__}: {str(err)[:200]}); "
                                     "greedy steps use torch.argmax")
            return False

    def _warm_up(self, fn: Callable[[], None]) -> None:
        """Two runs of ``fn`` before its capture (kernel compilation, cuBLAS workspaces) from the current ids and
        position, which are put back after each: a run writes only the cache slots that the real run writes before
        it reads them."""
        keep = self.ids.clone(), self.pos.clone()
        for _ in range(2):
            fn()
            self.ids.copy_(keep[0])
            self.pos.copy_(keep[1])

    def _capture(self, fn: Callable[[], None]) -> torch.cuda.CUDAGraph:
        """``fn`` captured as a CUDA graph, after its warm-up on a side stream."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._warm_up(fn)
        torch.cuda.current_stream(self.device).wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return g

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """One token for every sequence at ``self.pos``; returns the logits (a static buffer: copy to keep)."""
        if not self.graph:
            self._step()
            return self.out
        if self._graph is None:
            self._graph = self._capture(self._step)
        self._graph.replay()
        return self.out

    @torch.no_grad()
    def greedy(self, k: int) -> torch.Tensor:
        """k greedy steps from ``self.ids`` at ``self.pos`` (one graph replay on a GPU); returns their tokens
        (batch, k), a view of a static buffer (copy to keep).  ``self.ids`` and ``self.pos`` are left at the last
        token and the position after it."""
        if k > self.chunk:
            raise BinaryLLMError(f"greedy({k}): at most chunk={self.chunk} steps at once")
        if not self.graph:
            self._greedy_steps(k)
        else:
            if k not in self._greedy:
                self._greedy[k] = self._capture(lambda: self._greedy_steps(k))
            self._greedy[k].replay()
        return self.picked[:, :k]

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 eos_token_id: int | None = None, on_token: Callable[[torch.Tensor], None] | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        b, n = prompt_ids.shape
        if b != self.batch:
            raise BinaryLLMError(f"this decoder was built for batch {self.batch}, got {b} prompts; build another")
        if n + max_new_tokens > self.max_len:
            raise BinaryLLMError(f"prompt ({n}) + new tokens ({max_new_tokens}) exceed the cache of {self.max_len} "
                                 "tokens; build the decoder with a larger max_len")
        if max_new_tokens < 1:
            return prompt_ids.new_zeros(b, 0)
        self.cache.reset()
        prompt_ids = prompt_ids.to(self.device)
        logits = self._forward(prompt_ids, torch.arange(n, device=self.device))     # prefill, eager

        def pick(lg: torch.Tensor) -> torch.Tensor:
            if temperature <= 0:
                return lg.argmax(-1)
            probs = torch.softmax(lg.float() / temperature, -1)
            return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

        def emit(toks: torch.Tensor) -> int | None:
            """Hand the next tokens (batch, k) to ``on_token`` in order; returns None, or how many of them to keep
            where an end-of-sequence step (every sequence at ``eos_token_id``) ends the generation."""
            hit = (toks == eos_token_id).all(0).nonzero() if eos_token_id is not None else []
            stop = int(hit[0]) + 1 if len(hit) else None
            if on_token is not None:
                for j in range(toks.shape[1] if stop is None else stop):
                    on_token(toks[:, j])
            return stop

        nxt = pick(logits)[:, None]
        self._decode_marks = None
        if emit(nxt) is not None or max_new_tokens == 1:
            return nxt
        start = self._mark()
        tokens = [nxt]
        left = max_new_tokens - 1                     # steps still to run, one token each
        self.ids.copy_(nxt)
        self.pos.fill_(n)
        while left:
            if temperature <= 0:
                toks = self.greedy(self.chunk if self.graph and left >= self.chunk else 1).clone()
            else:
                toks = pick(self.step())[:, None]
                self._advance(toks)
            stop = emit(toks)
            tokens.append(toks[:, :stop])
            if stop is not None:
                break
            left -= toks.shape[1]
        out = torch.cat(tokens, 1)
        self._decode_marks = (start, self._mark())
        return out

    def _mark(self):
        """A point in time on the device's stream (a recorded CUDA event), or the host's clock off the GPU."""
        if self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def decode_seconds(self) -> float | None:
        """Seconds the last ``generate`` spent after its prefill: from its first token (picked from the prefill's
        logits) to its last, i.e. the n - 1 decoding steps of n new tokens; waits for the GPU.  None when the last
        generation made one token (or none ran)."""
        if self._decode_marks is None:
            return None
        start, end = self._decode_marks
        if isinstance(start, float):
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1e3
