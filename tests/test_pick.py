"""The one-kernel greedy pick (kernels/pick.py): argmax of each sequence's logits written into the chunk's token
buffer and the step's input ids, the position + 1, and its scratch slots left as found.  Under Triton's
interpreter (a child process with TRITON_INTERPRET=1, CPU tensors) against ``torch.argmax``, and on a CUDA GPU
directly and through ``StaticDecoder`` (the same tokens and last logits as with ``torch.argmax`` and the copies)."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import gpu_packed_model, hf_greedy, tiny_model

_CHILD = r"""
import sys, torch
from binaryllm.kernels import pick
cases = torch.load(sys.argv[1])
outs = []
for c in cases:
    B = c["logits"].shape[0]
    picked, ids, pos = torch.zeros(B, 3, dtype=torch.long), torch.full((B, 1), -1), torch.tensor([7])
    slots = pick.scratch(B, "cpu")
    for j in range(2):                          # twice: the slots must be back as they were after the first
        pick.pick_feed(c["logits"], picked[:, j], ids, pos, slots, c["block"])
    outs.append({"picked": picked, "ids": ids, "pos": pos, "slots": slots})
torch.save(outs, sys.argv[2])
"""


def _cases():
    g = torch.Generator().manual_seed(3)
    cases = []
    # (B, V, block): one program and many, a vocabulary that is no multiple of the block, a block wider than V
    for B, V, block in ((1, 32000, 2048), (2, 1000, 256), (3, 70, 16), (1, 5, 2048)):
        lg = torch.randn(B, V, generator=g) * 4
        lg[0, V // 3] = lg[0, V - 1] = 50.0                     # a tie across programs: the first index wins
        if B > 1:
            lg[1] = -lg[1].abs() - 1                          # all negative (the key's order of negative floats)
        if B > 2:
            lg[2] = float("-inf")
            lg[2, V - 1] = -3.0e38
        cases.append({"logits": lg.to(torch.bfloat16), "block": block})
    lg = torch.randn(2, 300, generator=g)
    lg[0, 17] = lg[0, 250] = float("nan")                     # torch.argmax takes the first NaN
    cases.append({"logits": lg, "block": 64})
    return cases


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    d = tmp_path_factory.mktemp("pick")
    cases = _cases()
    torch.save(cases, d / "in.pt")
    r = subprocess.run([sys.executable, "-c", _CHILD, str(d / "in.pt"), str(d / "out.pt")],
                       env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return cases, torch.load(d / "out.pt")


@pytest.mark.parametrize("i", range(5))
def test_pick_is_torch_argmax_fed_back(interpreted, i):
    from binaryllm.kernels.pick import KEY_EMPTY
    cases, outs = interpreted
    lg, out = cases[i]["logits"], outs[i]
    want = lg.argmax(-1)
    assert torch.equal(out["picked"][:, 0], want) and torch.equal(out["picked"][:, 1], want)
    assert torch.equal(out["picked"][:, 2], torch.zeros_like(want))       # columns it was not given: untouched
    assert torch.equal(out["ids"][:, 0], want)
    assert int(out["pos"]) == 9                                          # + 1 a call, once for all sequences
    assert (out["slots"][0] == KEY_EMPTY).all() and (out["slots"][1] == 0).all()


def test_pick_rejects_what_it_does_not_take():
    from binaryllm.kernels.pick import pick_feed, scratch
    lg = torch.zeros(2, 8)
    good = (torch.zeros(2, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    for bad in ((torch.zeros(2, dtype=torch.int32),) + good[1:], (good[0], torch.zeros(2, dtype=torch.long), good[2]),
                good[:2] + (torch.zeros(2, dtype=torch.long),)):
        with pytest.raises(ValueError, match="pick_feed takes"):
            pick_feed(lg, *bad, scratch(2, "cpu"))
    with pytest.raises(ValueError, match="pick_feed takes"):
        pick_feed(torch.zeros(8, 2).t(), *good, scratch(2, "cpu"))


def test_decoder_falls_back_to_torch_argmax_when_the_kernel_fails(monkeypatch):
    """A pick kernel that does not build or run (here: Triton, not interpreted, on CPU tensors) is said once, and the
    greedy steps go on with torch.argmax and the copies: the same tokens as transformers."""
    import binaryllm.kernels as kernels
    from binaryllm.decode import StaticDecoder
    from binaryllm.kernels.pick import scratch
    monkeypatch.setattr(kernels, "_WARNED", set())
    model = tiny_model("llama")
    ids = torch.randint(3, 96, (1, 5), generator=torch.Generator().manual_seed(9))
    dec = StaticDecoder(model, max_len=16)
    assert dec._pick is None                                   # not on the CPU ...
    dec._pick = scratch(1, "cpu")                              # ... unless forced
    with pytest.warns(UserWarning, match="greedy pick failed"):
        out = dec.generate(ids, 6)
    assert dec._pick is None and torch.equal(out, hf_greedy(model, ids, 6))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel itself runs on a CUDA GPU")
def test_gpu_pick_is_torch_argmax():
    from binaryllm.kernels.pick import KEY_EMPTY, pick_feed, scratch
    for i, c in enumerate(_cases()):
        lg = c["logits"].cuda()
        B = lg.shape[0]
        picked, ids, pos = (torch.zeros(B, 2, dtype=torch.long, device="cuda"),
                            torch.zeros(B, 1, dtype=torch.long, device="cuda"), torch.tensor([3], device="cuda"))
        slots = scratch(B, "cuda")
        for j in range(2):
            pick_feed(lg, picked[:, j], ids, pos, slots, c["block"])
        want = lg.argmax(-1)
        assert torch.equal(picked[:, 0], want) and torch.equal(picked[:, 1], want) and torch.equal(ids[:, 0], want)
        assert int(pos) == 5 and (slots[0] == KEY_EMPTY).all() and (slots[1] == 0).all(), i


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the decoder uses the kernel on a CUDA GPU")
@pytest.mark.parametrize("compile", [False, True])
def test_gpu_decoder_with_the_pick_kernel_gives_the_same_tokens_and_logits(compile):
    """Greedy chunks (8 steps a graph replay, then single steps) with the kernel and with torch.argmax + copies:
    the same tokens, the same last logits (``out``) and position, for two sequences."""
    import torch._dynamo
    from binaryllm.decode import StaticDecoder
    model = gpu_packed_model("llama")
    ids = torch.randint(3, 96, (2, 6), device="cuda", generator=torch.Generator("cuda").manual_seed(8))
    outs = []
    for pick in (True, False):
        torch._dynamo.reset()
        dec = StaticDecoder(model, max_len=40, batch=2, compile=compile, pick=pick)
        assert (dec._pick is not None) == pick
        outs.append((dec.generate(ids, 21), dec.out.clone(), int(dec.pos)))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert outs[0][2] == outs[1][2] == 6 + 20
