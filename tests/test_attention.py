"""The Triton decode attention (binaryllm.kernels.attention): the kernel against an fp32 reference under Triton's
interpreter (TRITON_INTERPRET=1, CPU tensors, fp16: the interpreter's bf16 dot is wrong, see test_kernels.py),
a decoder using it against the same decoder on SDPA, the fall-backs to SDPA, and the switch of a model's
attention; on a CUDA GPU also in bf16, eager and compiled."""
import os
import subprocess
import sys

import pytest
import torch
from conftest import sm90_ptx, tiny_model

from binaryllm.decode import StaticDecoder
from binaryllm.errors import BinaryLLMError
from binaryllm.kernels import DECODE_ATTENTION

# (B, H, KVH, L, D, mask kind, BINARYLLM_ATTN_CONFIG or None)
CASES = [
    (1, 9, 3, 144, 64, "bool", None),            # SmolLM2's heads: GQA 3, one program a KV head
    (2, 4, 4, 37, 128, "additive", None),        # MHA, ragged L, additive mask (as transformers' eager mask)
    (1, 8, 2, 1300, 48, "bool", None),           # head size not a power of 2; three chunks + the combine kernel
    (2, 6, 2, 70, 64, "none", None),
    (1, 4, 1, 700, 64, "bool", "16,4,32"),       # many small blocks, 22 chunks
    (2, 2, 2, 900, 32, "additive", None),        # split with an additive mask
    (3, 4, 2, 50, 64, "bool-shared", None),      # one mask row for the whole batch (broadcast)
    (2, 4, 2, 40, 64, "empty-row", None),        # a sequence with every key masked: 0, not NaN
    (2, 8, 2, 300, 64, "bool", "64,4,512,1"),    # masked keys not read
    (2, 4, 2, 40, 64, "empty-row", "16,4,32,1"),
]

_CHILD = r"""
import os, sys, torch
from binaryllm.kernels import attention as A
cases = torch.load(sys.argv[1])
out = []
for c in cases:
    if c["cfg"]:
        os.environ["BINARYLLM_ATTN_CONFIG"] = c["cfg"]
    else:
        os.environ.pop("BINARYLLM_ATTN_CONFIG", None)
    if "kn" in c:         # decode_attention_rope: the output and the caches it wrote into
        kc, vc = c["kc"].clone(), c["vc"].clone()
        y = A.decode_attention_rope(c["q"], c["kn"], c["vn"], c["cos"], c["sin"], kc, vc, c["pos"], c["mask"],
                                    c["scale"])
        out.append((y, kc, vc))
    else:
        out.append(A.decode_attention(c["q"], c["k"], c["v"], c["mask"], c["scale"]))
torch.save(out, sys.argv[2])
"""


def _case(B, H, KVH, L, D, kind, cfg):
    g = torch.Generator().manual_seed(B * 100 + L)
    q, k, v = (torch.randn(*s, generator=g).half() for s in ((B, H, 1, D), (B, KVH, L, D), (B, KVH, L, D)))
    pos = torch.randint(1, L, (B,), generator=g)
    filled = (torch.arange(L)[None, :] < pos[:, None]).view(B, 1, 1, L)
    mask = {"none": None, "bool": filled, "bool-shared": filled[:1],
            "additive": torch.zeros(B, 1, 1, L).masked_fill(~filled, torch.finfo(torch.float16).min).half(),
            "empty-row": filled & (torch.arange(B) > 0).view(B, 1, 1, 1)}[kind]
    return {"q": q, "k": k, "v": v, "mask": mask, "scale": None if kind != "none" else 0.3, "cfg": cfg}


def _run_child(code: str, *args, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _interpret(d, cases):
    """(cases, the kernel's outputs on them) from a child process under Triton's interpreter."""
    torch.save(cases, d / "in.pt")
    r = _run_child(_CHILD, d / "in.pt", d / "out.pt")
    assert r.returncode == 0, r.stderr[-3000:]
    return cases, torch.load(d / "out.pt")


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    return _interpret(tmp_path_factory.mktemp("attn"), [_case(*c) for c in CASES])


@pytest.mark.parametrize("i", range(len(CASES)))
def test_kernel_matches_fp32_attention(interpreted, i):
    from binaryllm.kernels.attention import reference
    cases, outs = interpreted
    c, y = cases[i], outs[i]
    B, H, _, D = c["q"].shape
    assert y.shape == (B, 1, H, D) and y.dtype == torch.float16
    ref = reference(c["q"], c["k"], c["v"], c["mask"], c["scale"]).float()
    assert not y.isnan().any()
    # p rounded to fp16 before p.v (as in flash attention) and one rounding of the output
    assert torch.allclose(y.float(), ref, atol=2e-3, rtol=2e-3), (y.float() - ref).abs().max()
    if CASES[i][5] == "empty-row":
        assert y[0].abs().max() == 0 and y[1].abs().max() > 0


# ---- decode_attention_rope: the rotary embedding of q and the token's key and both cache writes in the kernel ----

# (B, H, KVH, L, D, mask kind, BINARYLLM_ATTN_CONFIG or None, position, cos/sin per sequence)
ROPE_CASES = [
    (1, 9, 3, 144, 64, "bool", None, 100, False),      # SmolLM2's heads: one block of 256 keys loaded before the wait
    (1, 4, 4, 144, 128, "bool", None, 140, False),     # Llama-7B's head size: blocks of 128, the token in the second
    (1, 4, 4, 144, 128, "bool", None, 3, True),        # ... and in the first
    (2, 4, 2, 700, 32, "additive", None, 600, True),   # chunks + the combine kernel, the token in the second chunk
    (1, 2, 1, 300, 64, "bool", "16,4,32", 31, False),  # many chunks, the token on a chunk's last row
    (2, 6, 2, 40, 48, "none", None, 0, False),         # head size not a power of 2, no mask
]

def _rope_case(B, H, KVH, L, D, kind, cfg, pos, per_seq, dtype=torch.float16, device="cpu"):
    """q, k, v of the token as views of one projection output (B, 1, (H + 2 KVH) D), as the fused q/k/v layer
    gives them; cos/sin of a position (B or 1, 1, 1, D); caches filled with noise."""
    g = torch.Generator().manual_seed(L + D + pos)
    qkv = torch.randn(B, 1, (H + 2 * KVH) * D, generator=g)
    ang = (torch.randn(B if per_seq else 1, 1, 1, D // 2, generator=g) * 3).repeat(1, 1, 1, 2)
    kc, vc = torch.randn(B, KVH, L, D, generator=g), torch.randn(B, KVH, L, D, generator=g)
    qkv, cos, sin, kc, vc = (t.to(device, dtype) for t in (qkv, ang.cos(), ang.sin(), kc, vc))
    heads = lambda a, n: qkv[..., a * D:(a + n) * D].reshape(B, 1, n, D).transpose(1, 2)   # noqa: E731
    filled = (torch.arange(L) <= pos).view(1, 1, 1, L).to(device)
    mask = {"none": None, "bool": filled,
            "additive": torch.zeros(1, 1, 1, L, device=device).masked_fill(~filled, -1e4).to(dtype)}[kind]
    return {"q": heads(0, H), "kn": heads(H, KVH), "vn": heads(H + KVH, KVH), "cos": cos, "sin": sin, "kc": kc,
            "vc": vc, "pos": torch.tensor([pos], device=device), "mask": mask, "scale": None, "cfg": cfg}


def _rope_expected(c):
    """The unfused step: the rotary embedding (fp32, one rounding) of q and of the key written by index_copy_."""
    from binaryllm.kernels.attention import rope_reference
    kc, vc = c["kc"].clone(), c["vc"].clone()
    kc.index_copy_(2, c["pos"], rope_reference(c["kn"], c["cos"], c["sin"]))
    vc.index_copy_(2, c["pos"], c["vn"])
    return rope_reference(c["q"], c["cos"], c["sin"]), kc, vc


@pytest.fixture(scope="module")
def interpreted_rope(tmp_path_factory):
    cases = [_rope_case(*c) for c in ROPE_CASES]
    return _interpret(tmp_path_factory.mktemp("rope"), cases)


def test_rope_kernel_takes_a_short_rest_of_the_cache_as_one_tail_block():
    """Llama-7B's 144 keys in blocks of 128: the other 16 are one tail block, loaded before the wait with the first
    (the second ROPE_CASES case runs it); longer rests, several chunks or one block: no tail (a loop)."""
    from binaryllm.kernels.attention import tail_block
    assert tail_block(144, 128, 1) == 16 and tail_block(129, 128, 1) == 16 and tail_block(190, 128, 1) == 64
    assert tail_block(200, 128, 1) == 0 and tail_block(144, 256, 1) == 0 and tail_block(144, 128, 2) == 0
    assert tail_block(40, 32, 1) == 16 and tail_block(300, 16, 10) == 0


def _rope_ptx(tail: int) -> str:
    """sm_90 PTX of the rope kernel for Llama-7B's heads (144 keys, blocks of 128, boolean mask), compiled on this
    CPU box as it would be launched on a Hopper GPU; ``tail``: TAIL_N."""
    from binaryllm.kernels import attention as A
    ptr = {"po_ptr": "*fp32", "pml_ptr": "*fp32", "pos_ptr": "*i64", "m_ptr": "*i1"}
    const = dict(G=1, GP=16, D=128, DP=128, BLOCK_N=128, CHUNK_N=256, MASK=1, SPLIT=False, PDL=True, SKIP=False,
                 ROPE=True, TAIL_N=tail)
    sig = {n: "constexpr" if n in const else ptr.get(n, "*bf16") if n.endswith("_ptr") else
           "fp32" if n == "qk_scale" else "i32" for n in A._attn_kernel.arg_names}
    return sm90_ptx(A._attn_kernel, sig, const, {"num_warps": A.ROPE_WARPS})


def test_rope_kernel_compiles_for_hopper_with_the_tail_loaded_before_the_wait():
    """What the interpreter does not check: the kernel builds for sm_90 with and without the tail block (the first
    tail version did not: the loop after it changed a variable's type), spills nothing, and with the tail loads
    more of the cache before griddepcontrol.wait and less after it (no second 128-key block)."""
    plain, tail = _rope_ptx(0), _rope_ptx(16)
    for ptx in (plain, tail):
        assert "mma.sync" in ptx and "ld.local" not in ptx and "st.local" not in ptx
    (p_before, p_after), (t_before, t_after) = (ptx.split("griddepcontrol.wait", 1) for ptx in (plain, tail))
    assert t_before.count("ld.global") > p_before.count("ld.global")
    assert t_after.count("ld.global") < p_after.count("ld.global")


@pytest.mark.parametrize("i", range(len(ROPE_CASES)))
def test_rope_kernel_writes_the_cache_and_attends_like_the_unfused_step(interpreted_rope, i):
    """The caches are bit for bit those of rotary embedding + ``index_copy_`` (only row ``pos`` changes), and the
    output is the attention of the roped query over them (fp32 reference, fp16 rounding)."""
    from binaryllm.kernels.attention import reference
    cases, outs = interpreted_rope
    c, (y, kc, vc) = cases[i], outs[i]
    qr, kc_ref, vc_ref = _rope_expected(c)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
    pos = int(c["pos"])
    assert torch.equal(kc[:, :, :pos], c["kc"][:, :, :pos]) and not torch.equal(kc[:, :, pos], c["kc"][:, :, pos])
    ref = reference(qr, kc_ref, vc_ref, c["mask"], c["scale"]).float()
    assert torch.allclose(y.float(), ref, atol=2e-3, rtol=2e-3), (y.float() - ref).abs().max()


def test_rope_op_pytorch_path_is_the_unfused_step():
    """Off CUDA and outside the interpreter the op runs the same steps in PyTorch (what ``fuse_rope`` relies on
    when a compiled step runs on the CPU)."""
    from binaryllm.kernels import ops  # noqa: F401
    from binaryllm.kernels.attention import reference
    c = _rope_case(*ROPE_CASES[1])
    kc, vc = c["kc"].clone(), c["vc"].clone()
    y = torch.ops.binaryllm.decode_attention_rope(c["q"], c["kn"], c["vn"], c["cos"], c["sin"], kc, vc, c["pos"],
                                                  c["mask"], None)
    qr, kc_ref, vc_ref = _rope_expected(c)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
    assert torch.equal(y, reference(qr, kc_ref, vc_ref, c["mask"], None))


_ROPE_DECODER_CHILD = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
from conftest import tiny_model
import binaryllm.decode as decode
import torch._inductor.config as ic
ic.fx_graph_cache = False
real = decode.compile_options
model = tiny_model("llama").half()
ids = torch.randint(3, 96, (1, 5), generator=torch.Generator().manual_seed(3))
res = {}
for rope in (True, False):
    torch._dynamo.reset()
    decode.compile_options = lambda tune=False, r=rope: real(tune, rope=r)
    dec = decode.StaticDecoder(model, max_len=12, compile=True, attention=True)
    toks = dec.generate(ids, 3)
    res[rope] = {"tokens": toks, "logits": dec.out.clone(), "keys": [l.keys.clone() for l in dec.cache.layers],
                 "values": [l.values.clone() for l in dec.cache.layers],
                 "counts": dec.compile_options["post_grad_custom_post_pass"].counts, "attention": dec.attention}
torch.save(res, sys.argv[2])
"""


def test_compiled_decoder_with_rope_in_the_attention_keeps_tokens_and_caches(tmp_path):
    """A compiled decode step (CPU, the kernel interpreted) with ``fuse_rope`` against the same step without it:
    every layer rewritten, the same tokens, the caches equal up to the last bit of the roped keys (eager-free
    fp32 rotation in both; the CPU compiler may contract x cos + r sin into an fma) and the logits close."""
    r = _run_child(_ROPE_DECODER_CHILD, os.path.dirname(__file__), tmp_path / "out.pt")
    assert r.returncode == 0, r.stderr[-3000:]
    res = torch.load(tmp_path / "out.pt")
    on, off = res[True], res[False]
    assert on["attention"] and on["counts"]["rope"] > 0 and off["counts"]["rope"] == 0
    assert torch.equal(on["tokens"], off["tokens"])
    for a, b in zip(on["keys"] + on["values"], off["keys"] + off["values"]):
        assert torch.allclose(a.float(), b.float(), atol=4e-3, rtol=4e-3)
    assert torch.allclose(on["logits"].float(), off["logits"].float(), atol=2e-2, rtol=2e-2)


def test_reference_agrees_with_torch_sdpa():
    c = _case(2, 6, 2, 30, 32, "bool", None)
    q, k, v, m = (t.float() if t.dtype != torch.bool else t for t in (c["q"], c["k"], c["v"], c["mask"]))
    from binaryllm.kernels.attention import reference
    sd = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True).transpose(1, 2)
    assert torch.allclose(reference(q, k, v, m), sd, atol=1e-5)


_DECODE_CHILD = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
from conftest import tiny_model
from binaryllm.decode import StaticDecoder
from binaryllm.kernels import attention as A
calls = []
run = A.decode_attention
A.decode_attention = lambda *a: calls.append(a[0].shape) or run(*a)
res = {}
for arch in ("llama", "qwen2"):
    model = tiny_model(arch).half()
    ids = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(4))
    out = {}
    for on in (False, True):
        dec = StaticDecoder(model, 20, batch=2, attention=on)
        assert dec.attention == on, (arch, on)
        out[on] = (dec.generate(ids, 10), [])
        dec.cache.reset()
        dec._forward(ids, torch.arange(7))
        dec.ids.copy_(ids[:, -1:]); dec.pos.fill_(7)
        out[on][1].append(dec.step().clone())
    assert model.config._attn_implementation == "binaryllm_decode"
    res[arch] = out
torch.save({"res": res, "calls": calls}, sys.argv[2])
"""


def test_decoder_with_the_kernel_keeps_tokens_and_logits(tmp_path):
    """Under the interpreter, a tiny fp16 Llama and Qwen2 (GQA) decode the same tokens with the kernel as with SDPA,
    and the logits of one step agree; the kernel ran for every one-token step of every layer, never for a prefill."""
    r = _run_child(_DECODE_CHILD, os.path.dirname(__file__), tmp_path / "out.pt")
    assert r.returncode == 0, r.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    for arch, out in got["res"].items():
        assert torch.equal(out[True][0], out[False][0]), arch
        assert torch.allclose(out[True][1][0].float(), out[False][1][0].float(), atol=2e-2, rtol=1e-2), arch
    layers = tiny_model("llama").config.num_hidden_layers + tiny_model("qwen2").config.num_hidden_layers
    assert len(got["calls"]) == layers * (9 + 1) and all(s[2] == 1 for s in got["calls"])


def test_calls_the_kernel_does_not_cover_go_to_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from binaryllm.kernels.attention import attention_forward, covers
    model = tiny_model("llama")
    attn = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 4, 3, 16, generator=g), torch.randn(1, 2, 8, 16, generator=g), torch.randn(1, 2, 8, 16,
                                                                                                         generator=g)
    mask = torch.ones(1, 1, 3, 8, dtype=torch.bool).tril(5)
    assert not covers(q, k, v, mask, 0.0, {})                                # three query tokens (a prefill)
    assert not covers(q[:, :, :1].half(), k.half(), v.half(), None, 0.0, {})   # a CPU tensor, no interpreter
    ours, _ = attention_forward(attn, q, k, v, mask, scaling=0.25)
    ref, _ = sdpa_attention_forward(attn, q, k, v, mask, scaling=0.25)
    assert torch.equal(ours, ref)


def test_switching_a_model_and_back():
    from binaryllm.kernels.attention import use_decode_attention
    model = tiny_model("llama")
    assert model.config._attn_implementation == "sdpa"
    assert use_decode_attention(model) and model.config._attn_implementation == DECODE_ATTENTION
    ids = torch.randint(3, 96, (1, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():                          # on the CPU every call falls back to SDPA: the same logits
        a = model(ids).logits
        model.set_attn_implementation("sdpa")
        assert torch.equal(a, model(ids).logits)
    model.set_attn_implementation("eager")
    assert not use_decode_attention(model) and model.config._attn_implementation == "eager"   # left alone
    StaticDecoder(model, 8)                        # the CPU default keeps the model's attention
    assert model.config._attn_implementation == "eager"


def test_bad_tile_setting_is_one_line_error(monkeypatch):
    from binaryllm.kernels.attention import block_config
    monkeypatch.setenv("BINARYLLM_ATTN_CONFIG", "100,4")
    with pytest.raises(BinaryLLMError, match="BINARYLLM_ATTN_CONFIG='100,4' is not BLOCK_N,WARPS"):
        block_config(144, 64)
    monkeypatch.setenv("BINARYLLM_ATTN_CONFIG", "64,2,256")
    assert block_config(1000, 64) == (64, 2, 256, True) and block_config(100, 64) == (64, 2, 128, False)
    monkeypatch.setenv("BINARYLLM_ATTN_CONFIG", "64,2,256,1")
    assert block_config(100, 64) == (64, 2, 128, True)
    monkeypatch.setenv("BINARYLLM_ATTN_CONFIG", "64,2,256,2")
    with pytest.raises(BinaryLLMError, match="SKIP 0 or 1"):
        block_config(144, 64)
    monkeypatch.delenv("BINARYLLM_ATTN_CONFIG")
    assert block_config(144, 64) == (256, 4, 256, False) == block_config(144, 128)
    assert block_config(5000, 64) == (256, 4, 512, True) and block_config(5000, 128) == (64, 4, 512, True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU runs the kernel interpreted)")
@pytest.mark.parametrize("compiled", [False, True])
def test_gpu_bf16_kernel_and_compiled_decoder(compiled):
    from binaryllm.kernels.attention import decode_attention, reference
    for B, H, KVH, L, D, kind, cfg in CASES:
        c = _case(B, H, KVH, L, D, kind, cfg)
        if cfg:
            continue
        q, k, v = (c[n].cuda().bfloat16() for n in "qkv")
        m = c["mask"].cuda().to(torch.bfloat16 if c["mask"].dtype == torch.float16 else torch.bool) \
            if c["mask"] is not None else None
        y = decode_attention(q, k, v, m, c["scale"])
        ref = reference(q, k, v, m, c["scale"]).float()
        assert torch.allclose(y.float(), ref, atol=2e-2, rtol=2e-2), (B, H, L, D, kind)
    model = tiny_model("qwen2").to("cuda", torch.bfloat16)
    ids = torch.randint(3, 96, (1, 6), device="cuda", generator=torch.Generator("cuda").manual_seed(5))
    a = StaticDecoder(model, 30, compile=compiled, attention=False).generate(ids, 20)
    dec = StaticDecoder(model, 30, compile=compiled, attention=True)
    assert dec.attention
    assert torch.equal(dec.generate(ids, 20), a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU runs the kernel interpreted)")
def test_gpu_bf16_rope_kernel_is_the_plain_kernel_on_roped_inputs():
    """bf16 on the GPU: the caches bit for bit as the unfused step writes them, and the output the plain kernel's on
    the roped query and the written caches, up to bf16 rounding (its blocks and warps differ)."""
    from binaryllm.kernels.attention import decode_attention, decode_attention_rope
    for case in ROPE_CASES:
        c = _rope_case(*case[:-1], case[-1], dtype=torch.bfloat16, device="cuda")
        if c["cfg"]:
            continue
        kc, vc = c["kc"].clone(), c["vc"].clone()
        y = decode_attention_rope(c["q"], c["kn"], c["vn"], c["cos"], c["sin"], kc, vc, c["pos"], c["mask"])
        qr, kc_ref, vc_ref = _rope_expected(c)
        assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref), case
        assert torch.allclose(y.float(), decode_attention(qr, kc_ref, vc_ref, c["mask"]).float(), atol=1e-2,
                              rtol=1e-2), case
