"""Benchmarks (``binaryllm bench kernels|train``): every figure is a ratio against bf16 (GPU) or fp32 (CPU)
measured in the same process.  Prints a table and returns the rows (the CLI writes them as JSON).

kernels -- W1A16 matmul (Triton, from packed bits) vs cuBLAS bf16 ``F.linear`` on the same shapes: batch 1, 4,
           16 (decode) and 2048 tokens (prefill).  Each timing cycles through enough distinct weight copies
           (>= 4x the L2 cache) that weights come from HBM, as in a real model, and takes the median of CUDA-
           event timings of 50 back-to-back calls.  Prefill rows (2048 tokens) also time bf16 and unpack + cuBLAS
           in AB_PAIRS alternating pairs and report each pair's time ratio and their median (cuBLAS drifts by up
           to ~10% between repetitions).  Every kernel output is checked against the dense reference.
           On the CPU: the C lookup-table kernel vs a dense fp32 matmul, batch 1.
"""
from __future__ import annotations

import gc
import statistics
import time

import torch
import torch.nn.functional as F

from .errors import BinaryLLMError
from .kernels import DECODE_KERNELS

SHAPES = [(8192, 8192), (16384, 16384), (4096, 4096), (11008, 4096), (4096, 11008), (1536, 576), (576, 1536)]
AB_PAIRS = 5             # alternating (bf16, unpack) timing pairs of each prefill row


def _event_time(run, per: int = 1) -> float:
    """Seconds one ``run()`` takes on the GPU (CUDA events around it, then a synchronize), divided by ``per``
    (the calls it makes)."""
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    run()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / 1e3 / per


def _gpu_time(fn_list, iters: int = 50, reps: int = 5, graph: bool = True) -> float:
    """Median seconds per call over ``reps`` runs of ``iters`` calls cycling through fn_list.  graph=True:
    the calls are captured in one CUDA graph and replayed (GPU time, as in a graph-captured decode step);
    graph=False: launched from Python (includes launch overhead where it exceeds the GPU time)."""
    for f in fn_list[:3]:
        f()
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for f in fn_list[:3]:
                f()
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g):
            for i in range(iters):
                fn_list[i % len(fn_list)]()
        run = g.replay
    else:
        def run():
            for i in range(iters):
                fn_list[i % len(fn_list)]()
    run()
    torch.cuda.synchronize()
    return statistics.median(_event_time(run, iters) for _ in range(reps))


# tile configs swept on shapes >= 4096^2 (see triton_w1a16: GEMV_CONFIG, TC_CONFIG, GEMM_CONFIG for their fields)
GEMV_SWEEP = ((8, 16, 4), (4, 16, 4), (4, 32, 4), (8, 32, 4), (8, 8, 4), (8, 16, 2), (4, 32, 2), (2, 32, 2),
              (8, 32, 8), (4, 32, 4, 1), (8, 32, 8, 1), (2, 32, 2, 1))          # batch 1; 4th: x read in place
TC_SWEEP = ((64, 64, 4), (64, 128, 4), (128, 64, 4), (64, 64, 4, 2), (64, 64, 4, 4), (64, 128, 4, 2),
            (64, 128, 4, 4), (64, 64, 4, 8),                                    # batch 1-16; 4th: split over K
            (32, 32, 1), (32, 64, 1), (32, 32, 2), (64, 32, 2), (32, 64, 2), (16, 64, 1), (64, 32, 2, 2),
            (32, 32, 1, 2), (32, 64, 2, 2), (64, 32, 2, 4),                     # mma.sync tiles (see TC_CONFIG)
            (64, 64, 4, 1, 1), (64, 128, 4, 1, 1))                              # 5th: x read in place
MMA_SWEEP = ((1, 4, 4, 0, 0), (1, 4, 4, 1, 0), (1, 4, 4, 0, 1), (1, 4, 4, 1, 1), (1, 8, 1, 1, 1), (1, 8, 2, 1, 1),
             (1, 8, 2, 0, 1), (1, 4, 8, 0, 1), (1, 4, 8, 1, 1), (1, 2, 8, 0, 1), (1, 8, 4, 0, 1), (2, 4, 2, 1, 0),
             (2, 4, 2, 1, 1), (2, 4, 4, 1, 1), (2, 4, 4, 0, 1),
             (2, 8, 2, 1, 1), (1, 4, 2, 0, 1, 4), (1, 4, 4, 0, 1, 4), (1, 2, 4, 0, 1, 4), (1, 8, 2, 0, 1, 4),
             (2, 4, 4, 1, 1, 4), (1, 4, 4, 0, 1, 4, 1), (1, 4, 2, 0, 1, 4, 1), (1, 2, 8, 0, 1, 4, 1),
             (1, 8, 2, 0, 1, 4, 1))          # RT, warps, CH, FENCE, PDL[, CHAINS[, XS]] (mma_w1a16.MMA_CONFIG_1)
FUSED_SWEEP = ((128, 128, 32, 8, 1), (128, 64, 32, 4, 1), (64, 128, 16, 4, 1), (128, 128, 16, 8, 1),
               (128, 256, 16, 8, 1))                                            # prefill, 2048 rows


def _copies(nbytes: int, cap: int) -> int:
    """How many distinct copies of an ``nbytes`` operand to cycle through so that together they are >= 4x the
    L2 cache (each call reads from HBM, as in a real model): at least 2, at most ``cap``."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    l2 = getattr(props, "L2_cache_size", 50 * 2**20)
    return max(2, min(cap, -(-4 * l2 // nbytes)))


def _rel_err(y, ref) -> float:
    return ((y.float() - ref).abs().max() / ref.abs().max()).item()


def _sweep(x, words, scale, K: int, mode: str, configs, ref, tol: float, tiles=None) -> dict:
    """GPU µs of one kernel per tile config ("BNxWORDSx..." -> µs; the error's name for a tile that does not fit,
    "wrong (err)" for one whose output is off the dense reference ``ref`` of words[0] by more than ``tol``)."""
    from .kernels.triton_w1a16 import w1a16_matmul
    tiles = tiles or [None] * len(words)
    out = {}
    for cfg in configs:
        key = "x".join(map(str, cfg))
        try:
            err = _rel_err(w1a16_matmul(x, words[0], scale, K, mode=mode, config=cfg, tiles=tiles[0]), ref)
            if not err <= tol:
                out[key] = f"wrong ({err:.1e})"
                continue
            t = _gpu_time([lambda w=w, t=t: w1a16_matmul(x, w, scale, K, mode=mode, config=cfg, tiles=t)
                           for w, t in zip(words, tiles)])
            out[key] = round(t * 1e6, 2)
        except Exception as e:  # a tile that does not fit: say so, keep going
            out[key] = type(e).__name__
    return out


def _best(sweep: dict) -> tuple[str, float] | None:
    timed = [(k, v) for k, v in sweep.items() if isinstance(v, float)]
    return min(timed, key=lambda kv: kv[1]) if timed else None


def bench_kernels_gpu(shapes=SHAPES, batches=(1, 4, 16, 2048), log=print, sweep: str = "mma") -> list[dict]:
    """One row per (shape, batch); shapes of >= 4096^2 weights also get tile sweeps: sweep "mma" of the mma
    decode kernel, "all" of gemv and tc too, "none" of neither (prefill rows always sweep the fused kernel)."""
    from .export.bits import pack_signs, unpack_signs
    from .kernels import bmma_w1a16, mma_w1a16
    from .kernels.triton_w1a16 import prepare_weight, w1a16_matmul
    dev = torch.device("cuda")
    has_mma = mma_w1a16.usable(dev.index or 0)
    has_bmma = bmma_w1a16.usable(dev.index or 0)
    rows = []
    for N, K in shapes:
        g = torch.Generator(device=dev).manual_seed(N + K)
        dense = [torch.randn(N, K, device=dev, generator=g, dtype=torch.bfloat16) for _ in range(_copies(N * K * 2, 8))]
        bits = [pack_signs(torch.randn(N, K, device=dev, generator=g)) for _ in range(_copies(N * K // 8, 64))]
        words = [prepare_weight(b, K) for b in bits]
        tiles = [mma_w1a16.prepare_tiles(b, K) for b in bits] if has_mma else [None] * len(bits)
        scale = (torch.rand(N, device=dev, generator=g) + 0.5).half()
        for M in batches:
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16, generator=g)
            ref = (x.float() @ unpack_signs(bits[0], K, torch.float32).t()) * scale.float()
            bf16_calls = [lambda w=w: F.linear(x, w) for w in dense]
            t_bf = _gpu_time(bf16_calls)
            row = {"N": N, "K": K, "M": M, "bf16_us": round(t_bf * 1e6, 2)}
            modes = ((("mma",) if has_mma else ()) + (("bmma",) if has_bmma and M == 1 else ()) + ("gemv", "tc")
                     if M <= 16 else ("fused", "unpack"))
            for mode in modes:
                err = _rel_err(w1a16_matmul(x, words[0], scale, K, mode=mode, tiles=tiles[0]), ref)
                t = _gpu_time([lambda w=w, t=t: w1a16_matmul(x, w, scale, K, mode=mode, tiles=t)
                               for w, t in zip(words, tiles)])
                row[f"{mode}_us"] = round(t * 1e6, 2)
                row[f"{mode}_speedup"] = round(t_bf / t, 2)
                row[f"{mode}_weight_GBps"] = round(N * K / 8 / t / 1e9, 1)
                row[f"{mode}_max_rel_err"] = float(f"{err:.2e}")
            if N * K >= 4096 * 4096:
                tol = 1e-2       # every default tile measured 2e-3-3e-3 against this reference (RESULTS)
                sweeps = {"mma": MMA_SWEEP if M <= 16 and has_mma and sweep != "none" else (),
                          "gemv": GEMV_SWEEP if M == 1 and sweep == "all" else (),
                          "tc": TC_SWEEP if M <= 16 and sweep == "all" else (), "fused": FUSED_SWEEP if M > 16 else ()}
                for mode, configs in sweeps.items():
                    if configs:
                        row[f"{mode}_sweep_us"] = sw = _sweep(x, words, scale, K, mode, configs, ref, tol, tiles)
                        best = _best(sw)
                        if best:
                            row[f"best_{mode}"] = best[0]
                            row[f"best_{mode}_speedup"] = round(t_bf * 1e6 / best[1], 2)
            if M > 16:
                # cuBLAS's own time moves by up to ~10% between back-to-back repetitions on the H100 (clocks
                # under load), so one bf16 timing and one unpack timing taken one after the other can put the
                # ratio anywhere in 1.0-1.3x: time them in alternating pairs and report every pair's ratio
                unpack_calls = [lambda w=w: w1a16_matmul(x, w, scale, K, mode="unpack") for w in words]
                pairs = []
                for _ in range(AB_PAIRS):
                    tb = _gpu_time(bf16_calls, reps=3)
                    pairs.append(_gpu_time(unpack_calls, reps=3) / tb)
                row["unpack_ab_ratios"] = [round(r, 3) for r in pairs]
                row["unpack_ab_ratio_median"] = round(statistics.median(pairs), 3)
            row["eager_bf16_us"] = round(_gpu_time(bf16_calls, graph=False) * 1e6, 2)
            row["eager_auto_us"] = round(_gpu_time([lambda w=w, t=t: w1a16_matmul(x, w, scale, K, tiles=t)
                                                    for w, t in zip(words, tiles)], graph=False) * 1e6, 2)
            row["bf16_weight_GBps"] = round(N * K * 2 / t_bf / 1e9, 1)
            rows.append(row)
            log(row)
        del dense, bits, words, tiles
        torch.cuda.empty_cache()
    return rows


def bench_kernels_cpu(shapes=((4096, 4096), (11008, 4096), (4096, 11008), (1536, 576), (576, 1536)),
                      log=print) -> list[dict]:
    from .export.bits import pack_signs, unpack_signs
    from .kernels import cpu
    rows = []
    for N, K in shapes:
        x = torch.randn(1, K)
        bits = pack_signs(torch.randn(N, K))
        dense = unpack_signs(bits, K)
        scale = torch.rand(N) + 0.5

        def t(fn, n=20):
            fn()
            ts = []
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                ts.append((time.perf_counter() - t0) / n)
            return statistics.median(ts)
        t_d = t(lambda: F.linear(x, dense) * scale)
        t_l = t(lambda: cpu.w1_matmul_cpu(x, bits, scale, K))
        err = ((cpu.w1_matmul_cpu(x, bits, scale, K) - F.linear(x, dense) * scale).abs().max()).item()
        row = {"N": N, "K": K, "M": 1, "fp32_dense_us": round(t_d * 1e6, 1), "lut_us": round(t_l * 1e6, 1),
               "speedup": round(t_d / t_l, 2), "threads": torch.get_num_threads(), "max_abs_err": float(f"{err:.2e}")}
        rows.append(row)
        log(row)
    return rows


def train_flops_per_token(model, seq_len: int) -> float:
    """6 N (every matmul weight, the lm_head included, embeddings lookup excluded) + 12 L d T (attention)."""
    cfg = model.config
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    n = sum(p.numel() for p in model.parameters() if p.dim() >= 2 and p is not emb)
    if head is not None and head.weight is emb:
        n += emb.numel()  # tied: the head is still a matmul
    return 6 * n + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len


def bench_train(model_spec: str = "", seq_len: int = 2048, batch_size: int = 16, steps: int = 20, warmup: int = 5,
                variants=("fp/eager", "cpt/eager", "fp/compile", "cpt/compile"), peak_tflops: float = 989.0,
                log=print, device: str = "cuda") -> list[dict]:
    """Tokens/s, step time, MFU and peak memory of one optimizer step (forward, fused loss, backward, AdamW)
    for plain fine-tuning ("fp": the unbinarized model) and CPT with dual scaling ("cpt"), through the same code;
    eager or with the decoder blocks compiled.  Random token ids (speed only).  The CPT variant changes t every
    step, as the phases do, to show that a new t costs no recompilation.  "cpt+distill": CPT with distillation
    from the frozen unbinarized model (weight 1, temperature 1) through the chunked fused loss;
    "cpt+distill-logits": the same through both models' full logits (the trainer's path when the fused loss
    is off); MFU counts the student's training FLOPs only.  Modes: eager, compile (each decoder block, as
    ``convert --compile`` does) or compile-model (the whole backbone as one compiled module).
    ``device="cpu"`` runs the same steps without the memory figures (for the tests)."""
    import copy

    from .api import binarize, set_binarizer
    from .config import BinaryConfig
    from .models import load_model
    from .train.fast import compile_blocks
    from .train.loop import train_loss
    for v in variants:
        method, _, mode = v.partition("/")
        if method not in ("fp", "cpt", "cpt+distill", "cpt+distill-logits") or \
                mode not in ("eager", "compile", "compile-model"):
            raise BinaryLLMError(f"bench train variant {v!r}: use METHOD/MODE with METHOD fp, cpt, cpt+distill or "
                                 "cpt+distill-logits and MODE eager, compile (each block) or compile-model "
                                 "(the whole backbone)")
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if model_spec.startswith("random:"):     # the shape alone: speed does not depend on the weights
        name = model_spec.split(":", 1)[1]
        if name not in SHAPES_BY_NAME:
            raise BinaryLLMError(f"bench train --model {model_spec!r}: unknown shape; use random:NAME with NAME one "
                                 f"of {', '.join(SHAPES_BY_NAME)}, or a model folder / hub id")
        base = random_model(name, torch.float32)
    else:
        base, _, _ = load_model(model_spec)
    rows = []
    for v in variants:
        method, mode = v.split("/")
        torch._dynamo.reset()
        model = copy.deepcopy(base).to(dev).train()
        teacher = None
        if method.startswith("cpt+distill"):
            teacher = copy.deepcopy(base).to(dev).eval().requires_grad_(False)
        if method.startswith("cpt"):
            binarize(model, BinaryConfig(method="cpt"))
            set_binarizer(model, "cpt", 0.5)
        model.get_input_embeddings().weight.requires_grad_(False)
        for m in (model, teacher):      # the teacher as the trainer runs it: compiled like the student
            if m is None:
                continue
            if mode == "compile":
                compile_blocks(m)
            elif mode == "compile-model":  # one graph for embeddings, blocks and final norm (the loss stays fused)
                m.base_model.compile()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5, fused=cuda)
        g = torch.Generator(device=dev).manual_seed(0)
        vocab = model.config.vocab_size
        if cuda:
            torch.cuda.reset_peak_memory_stats()

        def step(i):
            if method.startswith("cpt"):
                set_binarizer(model, "cpt", 0.5 + 0.1 * i)
            ids = torch.randint(0, vocab, (batch_size, seq_len), device=dev, generator=g)
            with torch.autocast(dev.type, dtype=torch.bfloat16):     # the trainer's loss, fused but for -logits
                loss = train_loss(model, ids, fused=method != "cpt+distill-logits", teacher=teacher)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
        t0 = time.time()
        for i in range(warmup):
            step(i)
        sync()
        warm_s = time.time() - t0
        t0 = time.time()
        for i in range(steps):
            loss = step(warmup + i)
        sync()
        dt = (time.time() - t0) / steps
        tok_s = batch_size * seq_len / dt
        fpt = train_flops_per_token(model, seq_len)
        row = {"variant": v, "seq_len": seq_len, "batch_size": batch_size, "step_ms": round(dt * 1e3, 1),
               "tokens_per_s": round(tok_s), "mfu": round(tok_s * fpt / (peak_tflops * 1e12), 4),
               "peak_mem_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
               "warmup_s": round(warm_s, 1), "loss": round(float(loss.detach()), 3)}
        rows.append(row)
        log(row)
        model = opt = params = teacher = None
        if cuda:
            torch.cuda.empty_cache()
    return rows


SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                    max_position_embeddings=8192, rms_norm_eps=1e-5)
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=49152, tie_word_embeddings=False, max_position_embeddings=4096,
                rms_norm_eps=1e-5)   # TinyLlama-1.1B's shape with SmolLM2's vocabulary
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=4096,
                rms_norm_eps=1e-5)
SHAPES_BY_NAME = {"smollm2-135m": SMOLLM2_135M, "llama-1b": LLAMA_1B, "llama-7b": LLAMA_7B}


def random_model(name: str, dtype: torch.dtype, device: str = "cpu"):
    """A Llama of one of SHAPES_BY_NAME's shapes with seeded random weights (speed benches need no weights)."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(LlamaConfig(**SHAPES_BY_NAME[name]), dtype=dtype)


def random_packed_(model) -> int:
    """Replace every nn.Linear of the decoder blocks by a PackedBinaryLinear with random bits and a
    1/sqrt(in) row scale (speed only: the values do not matter).  Returns the number of layers replaced."""
    from .export.packed import _set_module
    from .nn import find_blocks
    from .nn.packed import PackedBinaryLinear
    name, blocks = find_blocks(model)
    dev = next(model.parameters()).device
    todo = [(f"{name}.{i}.{n}", m) for i, b in enumerate(blocks) for n, m in b.named_modules()
            if isinstance(m, torch.nn.Linear)]
    for full, m in todo:
        p = PackedBinaryLinear(m.in_features, m.out_features, bias=m.bias is not None, device=dev)
        p.weight.copy_(torch.randint(0, 256, p.weight.shape, dtype=torch.uint8, device=dev))
        p.weight_scale.fill_(m.in_features ** -0.5)
        _set_module(model, full, p)
        del m
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return len(todo)


def _weight_bytes(model) -> int:
    seen, n = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            n += t.numel() * t.element_size()
    return n


def _decode_tok_s(model, prompt_len: int, new_tokens: int, path: str) -> float:
    """Decode tokens/s at batch 1, greedy, the prefill (eager and launch-bound: not the decode step) not counted.
    path: eager (transformers' generate, dynamic cache), compiled (generate with a static cache and its compiled
    step), graph (binaryllm.decode: static cache, the step captured by hand as one CUDA graph, packed q/k/v and
    gate/up fused), graph-unfused (the same, one packed matmul per projection) or graph-compiled (the fused step
    compiled first).  The graph paths run the one-token attention through the Triton decode attention
    (``kernels/attention.py``), graph-compiled-sdpa is graph-compiled with transformers' SDPA instead,
    graph-compiled-tuned with inductor's coordinate descent tuning too (``decode.compile_options``: the fastest
    bf16 step at SmolLM2's size); transformers' generate (eager, compiled) always runs SDPA.

    Timing, after two warm-up runs: the graph paths take (new_tokens - 1) / the time from the first new token to
    the last on the GPU's stream (``StaticDecoder.decode_seconds``: CUDA events), median of five generations.  The
    transformers paths, which have no such hook without a host sync every token, take (new_tokens - 1) / (median
    time of new_tokens - median time of one new token), five timed runs of each, interleaved.  Until the
    twenty-fifth session every path took the median of three differences of single runs: on the 7B shape that gave
    834-1071 tok/s in six runs of a step that takes 1047-1060 us, the prefill's jitter landing in the difference."""
    from .decode import StaticDecoder, _set_decode_attention
    from .nn.fuse import unfuse_projections
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), device="cuda")
    unfuse_projections(model)                  # each path starts from the plain packed model
    _set_decode_attention(model, False)        # ... on SDPA
    if path.startswith("graph"):
        dec = StaticDecoder(model, prompt_len + new_tokens, compile=path.startswith("graph-compiled"),
                            fuse=path != "graph-unfused", attention=not path.endswith("-sdpa"),
                            tune=path.endswith("-tuned"))
        run = lambda n: dec.generate(ids, n)  # noqa: E731
    else:
        from transformers import CompileConfig
        kw = dict(do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
        if path == "compiled":   # static KV cache; transformers compiles the step ("reduce-overhead")
            kw.update(cache_implementation="static", compile_config=CompileConfig(fullgraph=False))
        else:
            kw.update(disable_compile=True)
        run = lambda n: model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)  # noqa: E731

    def timed(n: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        run(n)
        torch.cuda.synchronize()
        return time.perf_counter() - t0
    with torch.no_grad():
        run(new_tokens)            # warm-up (compilation, graph capture)
        run(new_tokens)
        if path.startswith("graph"):           # the steps after the prefill, timed on the GPU's stream
            rates = []
            for _ in range(5):
                run(new_tokens)
                rates.append((new_tokens - 1) / dec.decode_seconds())
            return statistics.median(rates)
        times = {new_tokens: [], 1: []}
        for _ in range(5):
            for n in times:
                times[n].append(timed(n))
    return (new_tokens - 1) / (statistics.median(times[new_tokens]) - statistics.median(times[1]))


def bench_decode_cpu(models=("smollm2-135m",), new_tokens: int = 32, prompt_len: int = 8, log=print) -> list[dict]:
    """Batch-1 greedy decoding on the CPU through binaryllm.decode (static cache, eager step): the fp32 model
    (the CPU's dense baseline) vs the same model with its block linears packed (random weights: speed only),
    unfused, with q/k/v and gate/up fused, and fused with the one-token step compiled (``torch.compile``: its
    warm-up is the compilation; compared with the compiled fp32 step).  Decode tokens/s = (new_tokens - 1) /
    (time of new_tokens - time of one token), so the prefill is not counted; best of three."""
    from .decode import StaticDecoder
    from .nn.fuse import unfuse_projections
    rows = []
    for name in models:
        model = random_model(name, torch.float32).eval()
        ids = torch.randint(0, model.config.vocab_size, (1, prompt_len))
        base: dict[bool, float] = {}
        for variant in ("fp32", "fp32-compiled", "packed-unfused", "packed-fused", "packed-fused-compiled"):
            if variant == "packed-unfused":
                random_packed_(model)
            unfuse_projections(model)
            torch._dynamo.reset()
            compiled = variant.endswith("compiled")
            dec = StaticDecoder(model, prompt_len + new_tokens, graph=False, fuse=variant.startswith("packed-fused"),
                                compile=compiled)

            def timed(n: int) -> float:
                t0 = time.perf_counter()
                dec.generate(ids, n)
                return time.perf_counter() - t0
            with torch.no_grad():
                timed(2)
                dt = min(timed(new_tokens) - timed(1) for _ in range(3))
            tps = (new_tokens - 1) / dt
            base[compiled] = base.get(compiled) or tps         # the fp32 rows come first
            row = {"model": name, "variant": variant, "threads": torch.get_num_threads(),
                   "weights_MiB": round(_weight_bytes(model) / 2**20, 1), "decode_tok_s": round(tps, 2),
                   "vs_fp32_same_path": round(tps / base[compiled], 2), "fused_groups": len(dec.fused)}
            rows.append(row)
            log(row)
        del model
    return rows


DECODE_PATHS = ("eager", "compiled", "graph-unfused", "graph", "graph-compiled", "graph-compiled-sdpa",
                "graph-compiled-tuned")   # see _decode_tok_s


def bench_decode(models=("smollm2-135m", "llama-7b"), new_tokens: int = 128, prompt_len: int = 16,
                 paths=("eager", "graph-unfused", "graph", "graph-compiled"), decode_kernels=DECODE_KERNELS,
                 log=print) -> list[dict]:
    """Batch-1 greedy decoding: the bf16 model vs the same model with its block linears packed (random weights:
    speed only), through the same generation code (see _decode_tok_s for the paths).  Memory: bytes of all
    weights; bandwidth: those bytes read once per token x tokens/s.  decode_kernels: the 1-bit kernel of the
    one-token steps (``triton_w1a16.DECODE_MODE``), one packed row each."""
    from .kernels import triton_w1a16 as tw
    default_mode = tw.DECODE_MODE
    rows = []
    for name in models:
        torch._dynamo.reset()
        model = random_model(name, torch.bfloat16, "cuda").eval()
        for variant in ("bf16",) + tuple(f"packed-{k}" for k in decode_kernels):
            if variant.startswith("packed"):
                if variant == f"packed-{decode_kernels[0]}":
                    random_packed_(model)
                tw.DECODE_MODE = variant.split("-", 1)[1]
                torch._dynamo.reset()
            wb = _weight_bytes(model)
            row = {"model": name, "variant": variant, "weights_MiB": round(wb / 2**20, 1)}
            gc.collect()          # decoders of the last variant or model (reference cycles) hold graphs and caches
            torch.cuda.reset_peak_memory_stats()
            for path in paths:
                try:
                    tps = _decode_tok_s(model, prompt_len, new_tokens, path)
                    row[f"{path}_tok_s"] = round(tps, 1)
                    row[f"{path}_GBps"] = round(wb * tps / 1e9, 1)
                except Exception as e:   # report and go on: one failing path must not hide the others
                    row[f"{path}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            torch.cuda.synchronize()
            row["peak_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            rows.append(row)
            log(row)
        tw.DECODE_MODE = default_mode
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return rows
