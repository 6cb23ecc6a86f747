"""Schedules of the binarizer temperature t.

CPT trains in C phases with t constant inside a phase.  ``phase_of(step)`` maps a training step to its
phase (1-based) and ``TSchedule.t(phase)`` gives t.  IR-Net anneals its own t per step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


class ScheduleError(ValueError):
    pass


@dataclass
class TSchedule:
    """t per phase.  kind: ``exp`` (paper: a*exp(b*c) - a), ``linear`` (t_start -> t_end),
    ``constant`` (t_end), ``list`` (values given)."""

    kind: str = "exp"
    phases: int = 20
    a: float = 1.3
    b: float = 0.22
    t_start: float = 0.1
    t_end: float = 100.0
    values: list[float] = field(default_factory=list)

    def validate(self) -> "TSchedule":
        if self.kind not in ("exp", "linear", "constant", "list"):
            raise ScheduleError(f"t schedule kind {self.kind!r} is not one of exp, linear, constant, list")
        if self.kind == "list":
            if not self.values:
                raise ScheduleError("t schedule 'list' needs values (e.g. --t-values 0.5,1,5,20)")
            n = len(self.values)
            if self.phases != n:
                self.phases = n
        if self.phases < 1:
            raise ScheduleError(f"t schedule needs at least 1 phase, got {self.phases}")
        ts = [self.t(c) for c in range(1, self.phases + 1)]
        bad = [x for x in ts if not (math.isfinite(x) and x > 0)]
        if bad:
            raise ScheduleError(f"t schedule gives non-positive or non-finite t ({bad[0]}); "
                                "every t must be > 0 and finite")
        if any(b < a for a, b in zip(ts, ts[1:])):
            raise ScheduleError("t schedule must not decrease from one phase to the next")
        return self

    def t(self, phase: int) -> float:
        c = min(max(int(phase), 1), self.phases)
        if self.kind == "exp":
            return self.a * math.exp(self.b * c) - self.a
        if self.kind == "linear":
            if self.phases == 1:
                return self.t_end
            return self.t_start + (self.t_end - self.t_start) * (c - 1) / (self.phases - 1)
        if self.kind == "constant":
            return self.t_end
        if self.kind == "list":
            return float(self.values[c - 1])
        raise ScheduleError(f"unknown t schedule kind {self.kind!r}")

    def values_all(self) -> list[float]:
        return [self.t(c) for c in range(1, self.phases + 1)]


def phase_of(step: int, total_steps: int, phases: int) -> int:
    """1-based phase of a 0-based step when ``total_steps`` are split into ``phases`` equal phases."""
    if total_steps <= 0:
        return phases
    return min(phases, step * phases // total_steps + 1)


def irnet_t(step: int, total_steps: int, t_min: float = 1e-3, t_max: float = 10.0) -> float:
    """IR-Net's log-linear annealing of t from t_min to t_max over training."""
    if total_steps <= 1:
        return t_max
    frac = min(max(step / (total_steps - 1), 0.0), 1.0)
    return t_min * (t_max / t_min) ** frac


def cosine_lr(step: int, total_steps: int, lr: float, lr_min: float, warmup: int = 0) -> float:
    """Linear warm-up then cosine decay from lr to lr_min over the remaining steps."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    span = max(total_steps - warmup, 1)
    frac = min(max((step - warmup) / span, 0.0), 1.0)
    return lr_min + 0.5 * (lr - lr_min) * (1.0 + math.cos(math.pi * frac))
