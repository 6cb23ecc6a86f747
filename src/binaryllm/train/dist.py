"""Multi-process training on PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``), launched by ``torchrun``.

* ``setup()`` joins the process group torchrun describes (WORLD_SIZE / RANK / LOCAL_RANK): NCCL on GPUs, gloo on
  the CPU (and, with a warning, where NCCL is missing); every collective times out after BINARYLLM_DIST_TIMEOUT
  seconds (600), so a rank that dies makes the others fail instead of waiting forever.
* ``shard()`` wraps every decoder block, then the root (embeddings, final norm, head).  fp32 master weights
  and optimizer state, sharded; fp32 gradient reduction; matmuls in bf16 under autocast.  The weights gathered
  for compute are fp32 by default (``--fsdp-params fp32``: the binarizer sees exactly what it sees on one GPU)
  or bf16 (``--fsdp-params bf16``: ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``, half the
  all-gather traffic, but S_a, F and their gradients then run on bf16 weights: on SmolLM2 at 8M tokens that
  run ended 0.19 nats worse than one GPU, docs/RESULTS.md).  The binarizer runs inside the block's forward on
  the *gathered* weight, so S_a is the mean over the full row, as on one GPU.
* ``save()`` / ``load()``: sharded checkpoints with ``torch.distributed.checkpoint`` (each rank writes its
  shards), in the same ``checkpoints/step-XXXXXXXX`` + ``latest`` layout as single-process runs, written under a
  temporary name and renamed by rank 0 once every rank is done.  DCP re-shards on load, so a run may resume on
  another number of ranks (the global batch stays the same).
* ``full_state_dict()``: the whole model gathered on rank 0 for the ordinary run folder (pack/eval unchanged).
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import BinaryLLMError
from ..io import atomic_write_text
from .checkpoint import STATE_VERSION

NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


@dataclass
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str = "auto") -> DistInfo | None:
    """Join torchrun's process group (None when not launched by torchrun with several processes)."""
    if not launched():
        return None
    for k, v in NCCL_ENV.items():
        os.environ.setdefault(k, v)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    backend = "gloo"
    if want_cuda:
        if not torch.cuda.is_available():
            raise BinaryLLMError(f"--device {device} asked for GPUs but none is available; use --device cpu")
        if dist.is_nccl_available():
            backend = "nccl"
        else:
            warnings.warn("binaryllm: NCCL is not available: falling back to gloo (slow on GPUs)", stacklevel=2)
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    timeout = timedelta(seconds=float(os.environ.get("BINARYLLM_DIST_TIMEOUT", "600")))
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timeout,
                                device_id=dev if backend == "nccl" else None)
    return DistInfo(rank, world, local, dev, backend)


def shard(model, bf16: bool, reshard: bool = True, *, device: torch.device | str) -> None:
    """FSDP2 over all ranks on ``device``'s type.  The mesh is named: without one, fully_shard puts the shards on
    the machine's accelerator whenever it has one, so a ``--device cpu`` run on a GPU host sent every rank to the
    GPUs (rank 1 of two failed on a one-GPU H100 machine, twenty-ninth session)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from ..nn import find_blocks
    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy(reduce_dtype=torch.float32)
    _, blocks = find_blocks(model)
    for b in blocks:
        fully_shard(b, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)


def mean(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean over ranks, left on the device (no host sync)."""
    t = x.detach().to(torch.float64).clone()
    dist.all_reduce(t)
    return t / info.world


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when it is True on one (so that all ranks stop at the same step)."""
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(info: DistInfo) -> None:
    dist.barrier()


def _states(model, optimizer):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    sd = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        sd["optim"] = get_optimizer_state_dict(model, optimizer)
    return sd


def save(ckpt_dir: Path, step: int, model, optimizer, state: dict, info: DistInfo, keep: int = 2) -> Path:
    import torch.distributed.checkpoint as dcp
    ckpt_dir = Path(ckpt_dir)
    name = f"step-{step:08d}"
    final, tmp = ckpt_dir / name, ckpt_dir / f".{name}.tmp"
    if info.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(info)
    # torch.distributed.checkpoint's get_optimizer_state_dict fills an optimizer that has no state yet with a
    # zero-gradient, lr-0 step: AdamW's step count would then start at 1, not 0 (other bias corrections: a
    # visibly different curve from the single-process run). Keep a fresh optimizer fresh.
    fresh = optimizer is not None and not optimizer.state
    dcp.save(_states(model, optimizer), checkpoint_id=str(tmp))
    if fresh:
        optimizer.state.clear()
    if info.main:
        (tmp / "state.json").write_text(json.dumps({"version": STATE_VERSION, "format": "dcp",
                                                    "world_size": info.world, **state}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(ckpt_dir / "latest", name + "\n")
        steps = sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir())
        for old in steps[: max(0, len(steps) - max(keep, 1))]:
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    barrier(info)
    return final


def load(ckpt: Path, st: dict, model, optimizer, info: DistInfo) -> None:
    """Load the sharded checkpoint ``ckpt`` whose state.json (``st``, from ``checkpoint.read_state``) the caller
    has read already."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    ckpt = Path(ckpt)
    if st.get("format") != "dcp":
        raise BinaryLLMError(f"{ckpt} is a single-process checkpoint; resume it without torchrun/--gpus (or "
                             f"start a new --out for a multi-GPU run)")
    if st.get("world_size") != info.world and info.main:
        warnings.warn(f"binaryllm: {ckpt} was written by {st.get('world_size')} ranks, resuming on {info.world}: "
                      f"torch.distributed.checkpoint re-shards it (the global batch is unchanged)", stacklevel=2)
    sd = _states(model, optimizer)
    dcp.load(sd, checkpoint_id=str(ckpt))
    set_model_state_dict(model, sd["model"])
    if optimizer is not None and "optim" in sd:
        set_optimizer_state_dict(model, optimizer, sd["optim"])
        if st.get("step") == 0:      # the placeholder state of a step-0 checkpoint (see save): start fresh
            optimizer.state.clear()


def full_state_dict(model, keep: list[str]) -> dict[str, torch.Tensor] | None:
    """The unsharded weights on rank 0 (None elsewhere), restricted to ``keep`` (tied copies dropped, as
    safetensors' save_model does for the single-process run)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    return {k: sd[k].contiguous() for k in keep}


def untied_names(model) -> list[str]:
    """State-dict names safetensors' save_model would write for this (unsharded) model: one name per shared
    storage, the same choice, so that ``load_run`` reads the file as it reads a single-process run's."""
    from safetensors.torch import _remove_duplicate_names
    sd = model.state_dict()
    drop = {n for group in _remove_duplicate_names(sd).values() for n in group}
    return [k for k in sd if k not in drop]
