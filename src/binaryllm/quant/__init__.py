"""The math of 1-bit weights: binarizers, scales and schedules (pure torch, no I/O)."""
from .progressive import (KINDS, ScaledBinarize, hard_binarize, progressive, progressive_grad,
                          row_scale, scaled_binarize, scaled_binarize_reference, sign)
from .schedule import ScheduleError, TSchedule, cosine_lr, irnet_t, phase_of

__all__ = ["KINDS", "ScaledBinarize", "hard_binarize", "progressive", "progressive_grad", "row_scale",
           "scaled_binarize", "scaled_binarize_reference", "sign", "ScheduleError", "TSchedule",
           "cosine_lr", "irnet_t", "phase_of"]
