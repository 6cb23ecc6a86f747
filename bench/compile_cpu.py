"""The packed decode step's torch.compile on the CPU, with the rewrites that only a GPU step gets forced on: every
packed layer called as ``binaryllm::w1a16`` with (dummy) mma tiles, the lm_head as ``binaryllm::dense_gemv``, the
decode attention op; the ops' CPU kernels compute.  What it tells: whether dynamo, the graph passes
(``kernels/fusion.py``) and inductor finish on the real transformers graph of a model shape, how long they take
and what the passes rewrote, without a GPU (twenty-seventh session: the H100 compile of the packed Llama-7B step
with ``fusion.LM_HEAD_NORM`` on did not finish; docs/RESULTS.md).  Run under torch 2.11 (the GPU machine's), the
tree before 069b383 stops with that compile's cause, a RecursionError in inductor's implicit-fallback log string.

    PYTHONPATH=src TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 python bench/compile_cpu.py LAYERS LM_HEAD_NORM [model [tiles]]
    # e.g. 32 1 llama-7b: the whole 7B shape, the final norm in the lm_head's GEMV; with "tiles" each layer's dummy
    # tile layout has the real size (two bits a weight) instead of one element
"""
import faulthandler
import sys
import time

import torch

from binaryllm import bench
from binaryllm.decode import StaticDecoder
from binaryllm.kernels import attention, dense, fusion, ops
from binaryllm.nn import packed

layers, fusion.LM_HEAD_NORM = int(sys.argv[1]), sys.argv[2] == "1"
name = sys.argv[3] if len(sys.argv) > 3 else "llama-7b"
attention.INTERPRETED = True            # the decode attention op on the CPU (its PyTorch kernel computes)
faulthandler.dump_traceback_later(600)  # where it is, should it take ten minutes
_TILES = torch.zeros(1, dtype=torch.int32)
REAL_SIZE = len(sys.argv) > 4 and sys.argv[4] == "tiles"


def _tiles(layer) -> torch.Tensor:
    if not REAL_SIZE:
        return _TILES
    if getattr(layer, "_dummy_tiles", None) is None:
        layer._dummy_tiles = torch.zeros(layer.out_features * layer.in_features // 16, dtype=torch.int32)
    return layer._dummy_tiles


def _fast(self, x, dt):                 # under compile: the op a CUDA step calls, with tiles
    if torch.compiler.is_compiling() and x.numel() <= 16 * self.in_features:
        return ops.w1a16(x.to(dt), self.words(), self.weight_scale, self.in_features, None, None, _tiles(self),
                         self.tile_pairs)
    return None


def _head(self, x):
    if torch.compiler.is_compiling() and x.numel() == self.weight.shape[1]:
        return ops.dense_gemv(x, self.weight)
    return torch.nn.functional.linear(x, self.weight, self.bias)


packed.PackedBinaryLinear._fast = _fast
dense.DenseGEMVLinear.forward = _head
bench.SHAPES_BY_NAME[name] = dict(bench.SHAPES_BY_NAME[name], num_hidden_layers=layers)
model = bench.random_model(name, torch.bfloat16)
bench.random_packed_(model)
dec = StaticDecoder(model, 32, graph=False, compile=True, gemv=True, attention=True)
for m in model.modules():               # made before the compile (the stacked q/k/v and gate/up layers' too)
    if isinstance(m, packed.PackedBinaryLinear):
        _tiles(m._fused[0].core if m._fused is not None else m)
ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
t = time.time()
with torch.no_grad():
    out = dec.generate(ids, 3)
print(f"{name}, {layers} layers, LM_HEAD_NORM={fusion.LM_HEAD_NORM}, real-size tiles {REAL_SIZE}: "
      f"compile + 3 tokens {time.time() - t:.1f} s, tokens {out.tolist()[0]}, "
      f"rewrites {dec.compile_options['post_grad_custom_post_pass'].counts}", flush=True)
