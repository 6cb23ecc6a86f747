"""The static-cache decoder (binaryllm.decode): the same tokens as transformers' generate, for plain and packed
1-bit models, on the CPU (where the step runs eagerly; the CUDA-graph capture of the same step is exercised by
``binaryllm bench decode`` on a GPU)."""
import pytest
import torch
from conftest import gpu_packed_model, hf_greedy, tiny_model

import binaryllm as bl
from binaryllm.decode import StaticDecoder, compile_options
from binaryllm.errors import BinaryLLMError
from binaryllm.export import pack


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_tokens_equal_transformers_generate(arch):
    model = tiny_model(arch)
    ids = torch.randint(3, 96, (1, 9), generator=torch.Generator().manual_seed(1))
    ref = hf_greedy(model, ids, 16)
    dec = StaticDecoder(model, max_len=40)
    assert torch.equal(dec.generate(ids, 16), ref)
    assert torch.equal(dec.generate(ids[:, :5], 16), hf_greedy(model, ids[:, :5], 16))   # the cache is reset


def test_step_writes_at_the_position_without_advancing_the_counters():
    """The step's own cache update (decode.py): keys and values land at the position buffer, as transformers'
    update would write them, and the layers' counters (one kernel each to advance in a compiled step) stay where
    the step set them; the prefill still goes through transformers' update."""
    from transformers.cache_utils import StaticLayer
    model = tiny_model("llama")
    ids = torch.randint(3, 96, (1, 7), generator=torch.Generator().manual_seed(2))
    dec = StaticDecoder(model, max_len=12)
    dec.generate(ids, 3)
    layers = dec.cache.layers
    assert all(type(lay) is StaticLayer and "update" in vars(lay) for lay in layers)
    keys = [lay.keys.clone() for lay in layers]
    dec.ids.fill_(5)
    dec.pos.fill_(9)
    dec.step()
    for lay, before in zip(layers, keys):
        assert int(lay.cumulative_length) == 9                    # set by the step, not advanced to 10
        assert torch.equal(lay.keys[:, :, :9], before[:, :, :9]) and lay.keys[:, :, 9].abs().sum() > 0
        assert lay.keys[:, :, 10:].abs().sum() == 0
    ref = StaticDecoder(model, max_len=12)                        # transformers' update on the same tokens
    ref._step_updates = lambda: 0
    ref.generate(ids, 3)
    ref.ids.fill_(5)
    ref.pos.fill_(9)
    ref.step()
    assert torch.equal(ref.out, dec.out) and torch.equal(ref.cache.layers[1].keys, layers[1].keys)
    assert int(ref.cache.layers[0].cumulative_length) == 10


def test_packed_model_and_batch_of_two():
    model = pack(bl.freeze(bl.binarize(tiny_model("llama"), bl.BinaryConfig())))
    ids = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(2))
    ref = hf_greedy(model, ids, 10)
    assert torch.equal(StaticDecoder(model, max_len=16, batch=2).generate(ids, 10), ref)


def test_eos_streaming_sampling_and_errors():
    model = tiny_model("llama")
    ids = torch.randint(3, 96, (1, 5), generator=torch.Generator().manual_seed(3))
    dec = StaticDecoder(model, max_len=24)
    greedy = dec.generate(ids, 12)
    seen = []
    eos = int(greedy[0, 3])
    out = dec.generate(ids, 12, eos_token_id=eos, on_token=lambda t: seen.append(int(t)))
    first = greedy[0].tolist().index(eos)
    assert out[0].tolist() == greedy[0, : first + 1].tolist() == seen          # stops after the first eos
    a = dec.generate(ids, 12, temperature=1.0, generator=torch.Generator().manual_seed(0))
    b = dec.generate(ids, 12, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (1, 12)
    with pytest.raises(BinaryLLMError, match="exceed the cache of 24"):
        dec.generate(ids, 20)
    with pytest.raises(BinaryLLMError, match="built for batch 1"):
        dec.generate(ids.repeat(2, 1), 4)
    with pytest.raises(BinaryLLMError, match="CUDA graphs need"):
        StaticDecoder(model, 8, graph=True)


def test_greedy_chunks_of_steps_give_the_same_tokens(monkeypatch):
    """Greedy decoding with graphs runs ``chunk`` steps per replay, each step's argmax fed back on the device
    (``StaticDecoder.greedy``), and the steps that fill no whole chunk one per replay.  Here each "graph" is its
    warm-up (two runs, ids and position put back) and then the function itself per replay, on the CPU: the same
    tokens as transformers, the end-of-sequence stop inside a chunk, and the streamed tokens."""
    from types import SimpleNamespace
    model = tiny_model("llama")
    ids = torch.randint(3, 96, (1, 7), generator=torch.Generator().manual_seed(6))
    ref = hf_greedy(model, ids, 19)
    dec = StaticDecoder(model, max_len=32, chunk=4)
    replays = []

    def capture(fn):
        dec._warm_up(fn)
        return SimpleNamespace(replay=lambda: (replays.append(int(dec.pos)), fn()))
    monkeypatch.setattr(dec, "_capture", capture)
    dec.graph = True
    assert torch.equal(dec.generate(ids, 19), ref)
    assert sorted(dec._greedy) == [1, 4] and dec._graph is None       # the plain step was never captured
    # 18 steps after the prefill's token: four chunks of four from position 7, then two single steps
    assert replays == [7, 11, 15, 19, 23, 24] and int(dec.pos) == 25
    assert torch.equal(dec.picked[:, 0], ref[:, -1])
    eos = int(ref[0, 6])
    first = ref[0].tolist().index(eos)
    seen = []
    out = dec.generate(ids, 19, eos_token_id=eos, on_token=lambda t: seen.append(int(t)))
    assert out[0].tolist() == ref[0, :first + 1].tolist() == seen                # cut inside its chunk
    with pytest.raises(BinaryLLMError, match="chunk=0"):
        StaticDecoder(model, 8, chunk=0)
    with pytest.raises(BinaryLLMError, match="at most chunk=4"):
        dec.greedy(5)


def test_decode_seconds_times_the_steps_after_the_prefill(monkeypatch):
    """``decode_seconds`` (what ``bench decode`` divides n - 1 tokens by): the time from the first token to the
    last, with the prefill outside it; None before any generation and after one of a single token."""
    import time
    model = tiny_model("llama")
    ids = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(7))
    dec = StaticDecoder(model, max_len=24)
    assert dec.decode_seconds() is None
    real = StaticDecoder._forward
    calls = []

    def slow_prefill(self, input_ids, positions):
        calls.append(input_ids.shape[1])
        if input_ids.shape[1] > 1:          # the prompt: sleep past anything the steps take
            time.sleep(0.5)
        return real(self, input_ids, positions)
    monkeypatch.setattr(StaticDecoder, "_forward", slow_prefill)
    t0 = time.perf_counter()
    dec.generate(ids, 8)
    wall = time.perf_counter() - t0
    took = dec.decode_seconds()
    assert calls[0] == 6                                # the prefill went through the slow forward
    assert 0 < took < wall - 0.5
    dec.generate(ids, 1)
    assert dec.decode_seconds() is None


def test_repeated_steps_are_idempotent(monkeypatch):
    """The CUDA graph is captured after warm-up runs of the same step: running a step several times must write the
    cache at the same slot each time (transformers' StaticLayer advances its own counter on every forward; with the
    cache exactly as long as the output, a drifting counter indexes past its end)."""
    model = tiny_model("llama")
    ids = torch.randint(3, 96, (1, 7), generator=torch.Generator().manual_seed(4))
    ref = hf_greedy(model, ids, 9)
    real = StaticDecoder._step

    def thrice(self, keep=True):
        for _ in range(3):
            out = real(self, keep)
        return out

    monkeypatch.setattr(StaticDecoder, "_step", thrice)
    assert torch.equal(StaticDecoder(model, max_len=16).generate(ids, 9), ref)


def test_compiled_step_gives_the_same_tokens_on_a_packed_model():
    """compile=True runs the one-token step through torch.compile; the packed layers enter the graph as single
    custom ops (kernels/ops.py).  Traced directly, the CPU kernel's ctypes call corrupted the heap."""
    model = pack(bl.freeze(bl.binarize(tiny_model("llama"), bl.BinaryConfig())))
    ids = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(5))
    ref = hf_greedy(model, ids, 8)
    dec = StaticDecoder(model, max_len=16, compile=True)
    assert torch.equal(dec.generate(ids, 8), ref)
    assert torch.equal(dec.generate(ids[:, :4], 8), hf_greedy(model, ids[:, :4], 8))   # no recompile needed
    import torch._inductor.config as ic
    # the step asks for PDL and combo kernels where this torch has them (inductor ignores both on the CPU, where
    # the generate calls above ran with them)
    expect = {k: True for k, have in (("triton.enable_pdl", hasattr(ic.triton, "enable_pdl")),
                                      ("combo_kernels", hasattr(ic, "combo_kernels"))) if have}
    from binaryllm.kernels.fusion import FusePackedLinear
    opts, tuned = compile_options(), compile_options(tune=True)
    # and the graph passes of kernels/fusion.py (tests/test_fusion.py)
    assert all(isinstance(o.pop("post_grad_custom_post_pass"), FusePackedLinear) for o in (opts, tuned))
    assert opts == expect == compile_options(glu=False, norm=False, rope=False)
    assert tuned == {**expect, "coordinate_descent_tuning": True}


def test_compiled_step_meets_the_packed_ops_with_their_lowerings_already_made():
    """The decoder gives inductor each binaryllm op's fallback lowering before the compile, with the layout
    constraint inductor would have chosen (kernels/ops.register_lowerings), so inductor makes no implicit fallback
    for them: torch 2.11 formatted such a fallback's log line eagerly, and behind a 7B network of fused kernels
    the string did not finish (docs/RESULTS.md)."""
    import logging

    from torch._inductor import lowering
    from torch._library.utils import get_layout_constraint_tag

    from binaryllm.kernels import ops
    model = pack(bl.freeze(bl.binarize(tiny_model("llama"), bl.BinaryConfig())))
    ids = torch.randint(3, 96, (1, 5), generator=torch.Generator().manual_seed(6))
    log, seen = logging.getLogger("torch._inductor.graph"), []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: seen.append(record.getMessage())
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        dec = StaticDecoder(model, max_len=16, compile=True)
        assert len(ops.all_ops()) == 9
        for op in ops.all_ops():
            assert op in lowering.lowerings, op
            want = lowering.tag_to_layout_constraint(get_layout_constraint_tag(op, with_default=True))
            assert lowering._maybe_layout_constraints.get(op) is want, op
        assert torch.equal(dec.generate(ids, 4), hf_greedy(model, ids, 4))
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert not [m for m in seen if "implicit fallback" in m and "binaryllm" in m]
    assert ops.register_lowerings() == 0                # all made once


@pytest.mark.skipif(not torch.cuda.is_available(), reason="programmatic dependent launch needs a CUDA GPU")
def test_compiled_gpu_step_gives_the_same_logits_with_and_without_pdl(monkeypatch):
    """PDL only changes when kernels may start (inductor's kernels and the mma kernel), combo kernels only how
    many launches there are: the compiled CUDA-graph step must give the same tokens and the same last logits,
    bit for bit, as without either (both with the gating pass)."""
    import time

    import torch._dynamo

    import binaryllm.decode as decode
    from binaryllm.kernels import mma_w1a16
    model = gpu_packed_model("llama")
    ids = torch.randint(3, 96, (1, 6), device="cuda", generator=torch.Generator("cuda").manual_seed(5))
    real = decode.compile_options
    outs = []
    for pdl in (1, 0):
        torch._dynamo.reset()
        monkeypatch.setattr(mma_w1a16, "PDL_DEFAULT", pdl)
        monkeypatch.setattr(decode, "compile_options", real if pdl else
                            lambda tune=False: {k: v for k, v in real(tune).items() if k == "post_grad_custom_post_pass"})
        dec = StaticDecoder(model, max_len=40, compile=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs.append((dec.generate(ids, 24), dec.out.clone()))
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        took = dec.decode_seconds()            # CUDA events around the 23 steps: inside the host's wall time
        assert isinstance(took, float) and 0 < took < wall
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the mma kernel's fused epilogues need a CUDA GPU")
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_compiled_gpu_step_fuses_gating_and_norms_into_the_packed_kernels(arch, monkeypatch):
    """The compile passes (kernels/fusion.py) make every block's silu(gate) * up in the packed gate/up kernel, and
    each residual add + RMSNorm between two packed layers in their kernels (the add and partial sums of squares in
    the o / down epilogue, the norm as q/k/v and gate/up read it); the step's logits stay those of the step
    without them, up to the rounding between the fused ops (inductor's own fused kernels do not round).  The
    rotary embedding + cache writes (``fuse_rope``) are in all three: tests/test_attention.py compares it."""
    import torch._dynamo

    import binaryllm.decode as decode
    from binaryllm.kernels import fusion
    model = gpu_packed_model(arch)
    L = model.config.num_hidden_layers
    ids = torch.randint(3, 96, (1, 6), device="cuda", generator=torch.Generator("cuda").manual_seed(5))
    real = decode.compile_options
    import torch._inductor.config as ic
    monkeypatch.setattr(ic, "fx_graph_cache", False)     # every graph goes through the pass (and is counted)
    outs = []
    for glu, norm in ((True, True), (True, False), (False, False)):
        torch._dynamo.reset()
        monkeypatch.setattr(decode, "compile_options", lambda tune=False, g=glu, n=norm: real(tune, glu=g, norm=n))
        dec = StaticDecoder(model, max_len=16, compile=True)
        dec.generate(ids, 2)                # one compiled step, on the same (eager prefill) token
        outs.append(dec.out.float().clone())
        p = dec.compile_options.get("post_grad_custom_post_pass")
        # per block: the gate/up; o and down produce, gate/up and the next block's q/k/v consume (where
        # fusion.LM_HEAD_NORM is on, the last block's down and the lm_head's GEMV with the final norm too); the
        # rotary embedding and cache writes go into every block's decode attention either way (and the rotary
        # angles' one-column matmul is a product: once a graph)
        assert dec.gemv
        n_norm = (4 * L - 2 + 2 * fusion.LM_HEAD_NORM) * norm
        assert {k: v for k, v in p.counts.items() if k != "outer"} == {"glu": L * glu, "norm": n_norm, "rope": L}
        assert p.counts["outer"] >= 1
    for out in outs[:-1]:
        assert torch.allclose(out, outs[-1], rtol=0.02, atol=0.02 * outs[-1].abs().max().item())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_projections_compute_the_same_with_fewer_packed_matmuls(arch, monkeypatch, tmp_path):
    from binaryllm.kernels import cpu
    from binaryllm.nn import fuse_projections, unfuse_projections
    from binaryllm.nn.packed import PackedBinaryLinear
    model = pack(bl.freeze(bl.binarize(tiny_model(arch), bl.BinaryConfig())))
    prefill = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(4))
    one = prefill[:1, :1]                  # one token: the C kernel's size (longer inputs: the reference path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    real = PackedBinaryLinear._fast
    monkeypatch.setattr(PackedBinaryLinear, "_fast",
                        lambda self, x, dt: calls.append(self.out_features) or real(self, x, dt))
    with torch.no_grad():
        ref = [model(input_ids=ids).logits for ids in (prefill, one)]
        n_plain = len(calls) // 2
        groups = fuse_projections(model)
        calls.clear()
        out = [model(input_ids=ids).logits for ids in (prefill, one)]
    assert len(calls) // 2 == n_plain - 3 * 2     # per block: q/k/v one matmul instead of three, gate/up one of two
    assert torch.allclose(out[0], ref[0], atol=1e-5, rtol=1e-5)
    assert cpu.available() and torch.equal(out[1], ref[1])   # the kernel computes each row alone: bit-identical
    p = "model.layers.0."
    assert [p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"] in groups
    assert [p + "mlp.gate_proj", p + "mlp.up_proj"] in groups and len(groups) == 2 * 2
    # two equal halves (gate, up) get paired mma tiles, for the gated epilogue (kernels/fusion.py); q/k/v do not
    layer = model.model.layers[0]
    assert layer.mlp.gate_proj._fused[0].core.tile_pairs == model.config.intermediate_size
    assert layer.self_attn.q_proj._fused[0].core.tile_pairs == 0
    assert fuse_projections(model) == []          # idempotent
    with pytest.raises(BinaryLLMError, match="unfuse_projections"):
        bl.export.save_packed(model, None, tmp_path / "x")
    assert unfuse_projections(model) == 5 * 2
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    ptrs = [t.untyped_storage().data_ptr() for t in after.values()]
    assert len(set(ptrs)) == len(ptrs)            # each buffer has its own storage again: safetensors writes it
    bl.export.save_packed(model, None, tmp_path / "x")


def test_decoder_fuses_packed_projections_and_keeps_the_tokens():
    model = pack(bl.freeze(bl.binarize(tiny_model("llama"), bl.BinaryConfig())))
    ids = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(5))
    ref = hf_greedy(model, ids, 12)
    dec = StaticDecoder(model, max_len=20)
    assert len(dec.fused) == 4 and torch.equal(dec.generate(ids, 12), ref)
    assert StaticDecoder(tiny_model("llama"), max_len=8).fused == []      # nothing packed: nothing to fuse


def test_fused_projections_trace_into_one_compiled_graph(monkeypatch):
    import torch._dynamo

    from binaryllm.kernels import cpu
    from binaryllm.nn import fuse_projections
    model = pack(bl.freeze(bl.binarize(tiny_model("llama"), bl.BinaryConfig())))
    ids = torch.randint(3, 96, (1, 1), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        assert len(fuse_projections(model)) == 4
        fn = lambda i: model(input_ids=i, use_cache=False).logits     # noqa: E731
        assert torch._dynamo.explain(fn)(ids).graph_break_count == 0
        torch._dynamo.reset()
        step = torch.compile(fn)
        step(ids)
        calls = []
        real = cpu.w1_matmul_cpu
        monkeypatch.setattr(cpu, "w1_matmul_cpu", lambda x, *a: calls.append(1) or real(x, *a))
        out = step(ids)
    assert len(calls) == 2 * 4                 # per block: qkv, o, gate/up, down (14 unfused)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)     # inductor fuses the norms: rounding only
