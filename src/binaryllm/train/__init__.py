"""Training: binary-aware init, the CPT loop with baselines, checkpoints, the convert pipeline."""
from .convert import convert, prepare_data
from .init import binary_aware_init, find_input_groups
from .loop import TrainData, Trainer


def train(model, cfg, data, out_dir=None, teacher=None, resume=False, progress=True) -> dict:
    """Train an already ``binarize``-d model on ``TrainData``; returns the summary."""
    return Trainer(model, cfg, data, out_dir, teacher=teacher, progress=progress).run(resume=resume)


__all__ = ["convert", "prepare_data", "binary_aware_init", "find_input_groups", "TrainData", "Trainer", "train"]
