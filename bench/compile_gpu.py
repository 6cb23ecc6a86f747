"""How long the packed Llama-7B decode step takes to compile on the GPU, and where it is while it does: Python stacks
of every thread go to stderr every DUMP_S seconds (faulthandler) until the compile and four tokens are done.
Twenty-seventh session: with ``fusion.LM_HEAD_NORM`` on, this compile did not finish on the H100 in 460 s (no FX
graph written, none of the step's fused kernels built); docs/RESULTS.md.  Twenty-eighth session: the cause was torch
2.11's eager log string for the implicit fallback of ``dense_gemv_norm`` (kernels/ops.register_lowerings).

    PYTHONPATH=src python bench/compile_gpu.py LM_HEAD_NORM DUMP_S [model]      # e.g. 1 60 llama-7b
"""
import faulthandler
import sys
import time

import torch

from binaryllm import bench
from binaryllm.decode import StaticDecoder
from binaryllm.kernels import fusion

fusion.LM_HEAD_NORM = sys.argv[1] == "1"
name = sys.argv[3] if len(sys.argv) > 3 else "llama-7b"
faulthandler.dump_traceback_later(int(sys.argv[2]), repeat=True)
t0 = time.time()
model = bench.random_model(name, torch.bfloat16, "cuda")
bench.random_packed_(model)
ids = torch.randint(0, model.config.vocab_size, (1, 16), device="cuda")
dec = StaticDecoder(model, 144, compile=True)
t1 = time.time()
with torch.no_grad():
    out = dec.generate(ids, 4)
torch.cuda.synchronize()
faulthandler.cancel_dump_traceback_later()
print(f"{name}, LM_HEAD_NORM={fusion.LM_HEAD_NORM}: model {t1 - t0:.1f} s, compile + 4 tokens {time.time() - t1:.1f} s,"
      f" tokens {out.tolist()[0]}, rewrites {dec.compile_options['post_grad_custom_post_pass'].counts}", flush=True)
