"""The 1-bit kernels against the dense reference: the C lookup-table kernel (CPU) directly, and the Triton
W1A16 kernel through Triton's interpreter (TRITON_INTERPRET=1, CPU tensors).  The interpreter of Triton 3.6
computes tl.dot wrongly for bf16 inputs (a two-line bf16 dot already fails there), so these CPU tests use
fp16; bf16 is checked on the GPU by `binaryllm bench kernels`, which also compares every output with the reference."""
import os

import pytest
import torch

import binaryllm as bl
from binaryllm.export import pack, pack_signs, unpack_signs
from binaryllm.kernels import cpu
from binaryllm.nn import packed as packed_mod
from conftest import pattern_blocks, tiny_model


def _ref(x, bits, scale, K, input_scale=None, bias=None, dt=torch.float32):
    """Dense reference: (x [* input_scale, rounded to dt]) @ sign^T in fp32, * row scale, + bias."""
    xs = x if input_scale is None else (x.to(dt) * input_scale.to(dt))
    y = xs.float() @ unpack_signs(bits, K).t() * scale.float()
    return y if bias is None else y + bias.float()


@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (1, 5, 13), (3, 70, 100), (8, 33, 256), (2, 129, 1000), (1, 64, 4096)])
def test_cpu_lut_kernel_matches_dense(M, N, K):
    assert cpu.available()
    g = torch.Generator().manual_seed(M * 1000 + K)
    x = torch.randn(M, K, generator=g)
    bits = pack_signs(torch.randn(N, K, generator=g))
    scale = torch.rand(N, generator=g) + 0.5
    got = cpu.w1_matmul_cpu(x, bits, scale, K)
    ref = _ref(x, bits, scale, K)
    # fp32 sums in another order: error ~ eps * sqrt(K) * |x|
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6 * K ** 0.5 * x.abs().max().item())


def test_packed_layer_uses_the_cpu_kernel_for_decode_and_agrees(monkeypatch):
    model = bl.binarize(tiny_model("llama"), bl.BinaryConfig())
    with torch.no_grad():
        first = next(iter(bl.binary_modules(model).values()))
        first.set_input_scale(torch.rand(first.in_features) + 0.5)
    pack(bl.freeze(model))
    ids = pattern_blocks(1, 6)
    calls = []
    real = cpu.w1_matmul_cpu
    monkeypatch.setattr(cpu, "w1_matmul_cpu", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        logits = []
        for t in range(1, 7):   # one row of activations per layer call: the kernel's case
            logits.append(model(input_ids=ids[:, :t]).logits[:, -1])
        assert calls
        monkeypatch.setattr(packed_mod, "USE_KERNELS", False)
        n = len(calls)
        ref = model(input_ids=ids).logits[0]
        assert len(calls) == n                               # reference path: kernel not called
    got = torch.cat(logits)
    assert torch.allclose(got, ref, atol=1e-4 * ref.abs().max().item())


CASES = [  # (M, N, K, config or None, mode)
    (1, 40, 96, None, "gemv"), (3, 70, 100, None, "gemv"), (16, 64, 300, (8, 4), "gemv"),      # decode, ragged K
    (1, 40, 96, (16, 16, 1), "tc"), (5, 70, 100, (16, 16, 1), "tc"), (16, 33, 1100, (32, 32, 1), "tc"),
    (3, 70, 100, None, "auto"),                                                      # auto: tc from 2 rows on
    (2, 40, 1100, (16, 16, 1, 3), "tc"), (1, 33, 300, (32, 16, 1, 2), "tc"),       # tc split over K (atomics)
    (1, 70, 1100, (64, 32, 2, 2), "tc"),                             # a 2-warp tile of the mma.sync sweep, split
    (1, 40, 100, (4, 32, 4, 1), "gemv"), (3, 70, 1000, (8, 16, 4, 1), "gemv"),       # x read in place (DIRECT)
    (1, 40, 100, (16, 16, 1, 1, 1), "tc"), (5, 70, 1100, (32, 32, 1, 2, 1), "tc"),
    (2, 40, 256, (4, 32, 4, 1), "gemv"), (2, 33, 256, (16, 16, 1, 1, 1), "tc"),      # DIRECT, K % 32 == 0, tile
    (2, 40, 256, (4, 8, 4, 1), "gemv"), (2, 33, 512, (16, 16, 1, 1, 1), "tc"),       # over or dividing the words
    (1, 33, 768, (16, 16, 1, 2, 1), "tc"),                      # 48 int16 words: 3 tiles, split 2 reads past them
    (20, 33, 64, (16, 16, 16, 4, 1), "fused"), (130, 129, 72, (64, 64, 16, 4, 1), "fused"),  # tensor-core tiles
    (40, 64, 1100, (32, 32, 16, 4, 1), "fused"),                                              # several word tiles
    (70, 65, 200, None, "unpack"),                                                             # dense temp + matmul
]

_CHILD = r"""
import json, sys, torch
from binaryllm.kernels.triton_w1a16 import prepare_weight, w1a16_matmul
cases = torch.load(sys.argv[1])
out = []
for c in cases:
    out.append(w1a16_matmul(c["x"], prepare_weight(c["bits"], c["K"]), c["scale"], c["K"], input_scale=c["s_in"],
                            bias=c["bias"], config=c["cfg"], mode=c["mode"]))
    if c["K"] == 64:
        w = prepare_weight(c["bits"], 64)
        assert w.data_ptr() == c["bits"].data_ptr() and w.dtype == torch.int32   # aligned: a free view
torch.save(out, sys.argv[2])
"""


def _case(M, N, K, cfg, mode, extras):
    g = torch.Generator().manual_seed(M + N + K)
    dt = torch.float16
    return {"x": torch.randn(M, K, generator=g).to(dt), "bits": pack_signs(torch.randn(N, K, generator=g)),
            "scale": (torch.rand(N, generator=g) + 0.5).half(), "K": K, "cfg": cfg, "mode": mode,
            "s_in": (torch.rand(K, generator=g) + 0.5).half() if extras else None,
            "bias": torch.randn(N, generator=g).to(dt) if extras else None}


@pytest.fixture(scope="module")
def interpreted_results(tmp_path_factory):
    """Every case run by the Triton kernel under TRITON_INTERPRET=1, in a fresh process: the interpreter must be
    on before triton decorates anything, and this test process may have imported triton already."""
    import subprocess
    import sys
    d = tmp_path_factory.mktemp("triton")
    cases = [_case(*c, extras) for c in CASES for extras in (False, True)]
    torch.save(cases, d / "in.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", _CHILD, str(d / "in.pt"), str(d / "out.pt")], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return cases, torch.load(d / "out.pt")


@pytest.mark.parametrize("i", range(2 * len(CASES)))
def test_triton_kernel_matches_dense(interpreted_results, i):
    cases, outs = interpreted_results
    c, y = cases[i], outs[i]
    M, N = c["x"].shape[0], c["bits"].shape[0]
    assert y.dtype == torch.float16 and y.shape == (M, N)
    ref = _ref(c["x"], c["bits"], c["scale"], c["K"], c["s_in"], c["bias"], torch.float16)
    # one rounding of the fp32 result to fp16 (half an ulp: 2^-11 relative), plus fp32 summation order
    assert torch.allclose(y.float(), ref, rtol=2 ** -10, atol=1e-5 * c["K"] ** 0.5 * ref.abs().max().item())


def test_decode_kernel_choice_follows_the_measurements():
    from binaryllm.kernels import triton_w1a16 as tw
    assert tw.DECODE_MODE == "auto"
    assert tw.decode_mode(1, 4096, 11008) == "gemv" and tw.decode_mode(1, 8192, 8192) == "tc"
    assert tw.decode_mode(2, 576, 576) == "tc" and tw.decode_mode(16, 4096, 4096) == "tc"


def test_prepare_weight_pads_unaligned_rows():
    from binaryllm.kernels.triton_w1a16 import prepare_weight
    w2 = prepare_weight(pack_signs(torch.randn(4, 40)), 40)
    assert w2.dtype == torch.int32 and w2.shape == (4, 2) and (w2[:, 1] >> 8).eq(0).all()   # zero padding bits


def test_packed_model_decodes_the_same_with_a_static_cache(tokenizer):
    """The decode path of bench decode (transformers' static KV cache) gives the greedy tokens of the plain
    dynamic cache, on a packed model (CPU: the C kernel for the one-token steps)."""
    model = pack(bl.freeze(bl.binarize(tiny_model("llama", vocab=len(tokenizer)), bl.BinaryConfig())))
    ids = pattern_blocks(1, 8, vocab=len(tokenizer))
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(ids),
              pad_token_id=0, disable_compile=True)
    with torch.no_grad():
        dyn = model.generate(ids, **kw)
        sta = model.generate(ids, cache_implementation="static", **kw)
    assert dyn.shape == (1, 20) and torch.equal(dyn, sta)


def test_random_packed_replaces_block_linears():
    from binaryllm.bench import random_packed_
    from binaryllm.export import packed_modules
    model = tiny_model("llama")
    assert random_packed_(model) == 2 * 7 and len(packed_modules(model)) == 14
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=pattern_blocks(1, 8)).logits).all()


def test_cpu_kernel_custom_op_passes_opcheck_and_matches():
    """kernels/ops.py: the op that torch.compile sees (schema, fake shape, values) is the kernel."""
    from binaryllm.kernels import ops
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 100, generator=g)
    bits = pack_signs(torch.randn(17, 100, generator=g))
    scale = torch.rand(17, generator=g) + 0.5
    torch.library.opcheck(ops.w1_cpu, (x, bits, scale, 100))
    assert torch.equal(ops.w1_cpu(x, bits, scale, 100), cpu.w1_matmul_cpu(x, bits, scale, 100))


def test_bench_cli_writes_its_json_after_every_row(tmp_path, monkeypatch):
    """A bench stopped by a time limit keeps the rows it measured: --json is rewritten after each one."""
    import json

    from binaryllm import bench
    from binaryllm.cli import main
    real = bench.bench_kernels_cpu
    seen = []

    def small(log):
        def spy(row):
            log(row)
            seen.append(len(json.loads((tmp_path / "k.json").read_text())["rows"]))
        return real(shapes=((64, 64), (32, 96)), log=spy)
    monkeypatch.setattr(bench, "bench_kernels_cpu", small)
    assert main(["bench", "kernels-cpu", "--json", str(tmp_path / "k.json")]) == 0
    rows = json.loads((tmp_path / "k.json").read_text())["rows"]
    assert seen == [1, 2] and [(r["N"], r["K"]) for r in rows] == [(64, 64), (32, 96)]
    assert all(r["max_abs_err"] < 1e-3 and r["lut_us"] > 0 for r in rows)


def test_tile_config_from_the_environment(monkeypatch):
    from binaryllm.errors import BinaryLLMError
    from binaryllm.kernels.triton_w1a16 import _env_config
    monkeypatch.delenv("BINARYLLM_TC_CONFIG", raising=False)
    assert _env_config("BINARYLLM_TC_CONFIG", (64, 64, 4)) == (64, 64, 4)
    monkeypatch.setenv("BINARYLLM_TC_CONFIG", " 32,64,2,4 ")
    assert _env_config("BINARYLLM_TC_CONFIG", (64, 64, 4)) == (32, 64, 2, 4)
    for bad in ("32,x,2", "32,64"):
        monkeypatch.setenv("BINARYLLM_TC_CONFIG", bad)
        with pytest.raises(BinaryLLMError, match="BINARYLLM_TC_CONFIG.*fix or unset it"):
            _env_config("BINARYLLM_TC_CONFIG", (64, 64, 4))


@pytest.mark.parametrize("argv,msg", [
    (["bench", "kernels", "--shapes", "8192x"], "--shapes: '8192x' is not of the form NxN"),
    (["bench", "kernels", "--batches", "1,-2"], "--batches: '-2'"),
    (["bench", "decode", "--paths", "graph,warp"], "--paths: unknown 'warp'"),
    (["bench", "decode", "--kernels", "mma,fast"], "--kernels: unknown 'fast'; choose from mma, gemv, tc"),
    (["bench", "decode-cpu", "--paths", "graph"], "--paths applies to bench decode, not bench decode-cpu; drop it"),
    (["bench", "kernels-cpu", "--models", "llama-7b"], "--models applies to bench decode and decode-cpu, not bench"),
    (["bench", "decode-cpu", "--models", "gpt9"], "--models: unknown 'gpt9'; choose from smollm2-135m"),
])
def test_bench_options_bad_input_is_one_line(argv, msg, capsys):
    from binaryllm.cli import main
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and "\n" not in err
