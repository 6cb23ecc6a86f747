"""The training loop: stage 1 (binary-aware init), then CPT (or a baseline), then freeze.

Everything that decides a step -- batch, learning rate, binarizer kind and t -- is a pure function of the
step number, so a resumed run repeats an uninterrupted one exactly (same data order, optimizer state, RNG
and schedule position, all restored from the checkpoint).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..api import binary_modules, restore_input_scales, set_binarizer
from ..config import RunConfig, parse_tokens, profile_range
from ..data import BlockOrder
from ..errors import BinaryLLMError
from ..eval.ppl import window_nll
from ..io import atomic_write_text
from ..quant import cosine_lr, irnet_t, phase_of
from .checkpoint import latest_checkpoint, load_checkpoint, read_state, save_checkpoint
from .dist import any_rank as dist_any_rank
from .dist import mean as dist_mean
from .fast import compile_blocks, lm_distill_loss, lm_loss
from .init import binary_aware_init


class StepProfiler:
    """``--profile A:B``: torch.profiler over training steps A..B-1, written per rank to ``<out>/profile/``:
    ``rank<R>.json`` (a Chrome/Perfetto trace) and ``rank<R>.txt`` (the top operators by device, else CPU, time)."""

    def __init__(self, spec: str, out: Path | None, rank: int, cuda: bool):
        if spec and out is None:
            raise BinaryLLMError("--profile needs an --out folder to write its traces to")
        self.a, self.b = profile_range(spec) if spec else (-1, -1)
        self.dir = out / "profile" if spec else None
        self.rank, self.cuda, self.prof = rank, cuda, None

    def before(self, step: int) -> None:
        if self.dir is None or step != self.a:
            return
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self.prof = profile(activities=acts, record_shapes=False)
        self.prof.__enter__()

    def after(self, step: int, last: bool) -> None:
        if self.prof is None or (step + 1 < self.b and not last):
            return
        if self.cuda:
            torch.cuda.synchronize()
        self.prof.__exit__(None, None, None)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.prof.export_chrome_trace(str(self.dir / f"rank{self.rank}.json"))
        key = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        table = self.prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=70)
        atomic_write_text(self.dir / f"rank{self.rank}.txt",
                          f"steps {self.a}..{min(step, self.b - 1)}, rank {self.rank}\n{table}\n")
        self.prof = None


@dataclass
class TrainData:
    train: torch.Tensor  # (N, seq_len) int64 blocks
    val: torch.Tensor    # (M, seq_len)


@dataclass
class StepPlan:
    kind: str
    t: float
    phase: int


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BinaryLLMError(f"--device {name} asked for a GPU but none is available; use --device cpu")
    return dev


def autocast_for(device: torch.device, amp: str):
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "none"
    if amp == "none":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


def causal_lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    v = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, v).float(), ids[:, 1:].reshape(-1))


def distill_kl(student: torch.Tensor, teacher: torch.Tensor, temp: float) -> torch.Tensor:
    """KL(teacher || student) per token, averaged, times temp^2 (Hinton et al.)."""
    v = student.shape[-1]
    s = F.log_softmax(student[:, :-1].reshape(-1, v).float() / temp, dim=-1)
    t = F.log_softmax(teacher[:, :-1].reshape(-1, v).float() / temp, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temp * temp


def train_loss(model, ids: torch.Tensor, fused: bool, teacher=None, distill_weight: float = 1.0,
               distill_temp: float = 1.0) -> torch.Tensor:
    """The training objective on ``ids``: next-token CE, plus ``distill_weight`` * KL(teacher || student) when a
    teacher is given; through the chunked fused losses (``fast.py``) when ``fused`` and the model allows it,
    else through the full logits."""
    if teacher is not None:
        loss = lm_distill_loss(model, teacher, ids, distill_weight, distill_temp) if fused else None
        if loss is None:
            logits = model(input_ids=ids, use_cache=False).logits
            with torch.no_grad():
                tl = teacher(input_ids=ids).logits
            loss = causal_lm_loss(logits, ids) + distill_weight * distill_kl(logits, tl, distill_temp)
        return loss
    if fused:
        return lm_loss(model, ids)
    return causal_lm_loss(model(input_ids=ids, use_cache=False).logits, ids)


class Trainer:
    def __init__(self, model, cfg: RunConfig, data: TrainData, out_dir: str | Path | None = None,
                 teacher=None, progress: bool = True, dist=None):
        self.model, self.cfg, self.data, self.teacher = model, cfg, data, teacher
        self.dist = dist            # train.dist.DistInfo when launched by torchrun, else None
        self.main = dist is None or dist.main
        self.out = Path(out_dir) if out_dir else None
        if self.out is not None and self.main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.progress = progress and self.main
        t, b = cfg.train, cfg.binary
        self.device = dist.device if dist is not None else resolve_device(t.device)
        if dist is not None:
            if t.batch_size % dist.world:
                raise BinaryLLMError(f"--batch-size {t.batch_size} is the global batch and must be a multiple of the "
                                     f"{dist.world} ranks")
            if teacher is not None:
                raise BinaryLLMError("--distill is not supported with several GPUs yet; drop --distill or --gpus")
        self.autocast = autocast_for(self.device, t.amp)
        self.tokens_per_step = t.batch_size * t.grad_accum * t.seq_len
        self.total_steps = 0 if b.method == "sign" else max(1, math.ceil(parse_tokens(t.tokens) / self.tokens_per_step))
        use_hard = b.method == "cpt" and b.hard_fraction > 0
        self.hard_start = (self.total_steps - max(1, round(self.total_steps * b.hard_fraction))) if use_hard \
            else self.total_steps
        self.schedule = b.schedule()
        if b.method == "cpt" and 0 < self.hard_start < self.schedule.phases:
            import warnings
            warnings.warn(f"only {self.hard_start} CPT steps for {self.schedule.phases} phases: some phases "
                          "are skipped; raise --tokens or lower --phases", stacklevel=2)
        self.order = BlockOrder(data.train.shape[0], t.batch_size, t.seed)
        # --max-minutes: a wall-clock deadline (``convert`` moves it back to its own start, so that loading,
        # tokenizing and stage 1 count too)
        self.deadline = time.time() + 60 * t.max_minutes if t.max_minutes else None
        self.optimizer = None
        self.summary: dict = {}

    # ---- the schedule: a pure function of the step ---------------------------------------------
    def plan(self, step: int) -> StepPlan:
        b = self.cfg.binary
        if b.method == "cpt":
            c = phase_of(min(step, self.hard_start - 1) if self.hard_start > 0 else 0,
                         max(self.hard_start, 1), self.schedule.phases)
            t = self.schedule.t(c)
            if step >= self.hard_start:
                return StepPlan("ste" if b.hard_backward == "ste" else "hard", t, self.schedule.phases + 1)
            return StepPlan("cpt", t, c)
        if b.method == "irnet":
            return StepPlan("irnet", irnet_t(step, self.total_steps, b.irnet_t_min, b.irnet_t_max), 1)
        if b.method == "ste":
            return StepPlan("ste", 1.0, 1)
        if b.method == "fp":
            return StepPlan("identity", 1.0, 1)
        return StepPlan("sign", 1.0, 1)

    def lr(self, step: int) -> float:
        t = self.cfg.train
        return cosine_lr(step, self.total_steps, t.lr, t.lr_min, t.warmup_steps)

    def batch(self, k: int, order: BlockOrder | None = None, full: bool = False) -> torch.Tensor:
        """Micro-batch k of the global order; with several ranks, this rank's contiguous slice of it
        (``full``: the whole global batch, for the identical-on-every-rank stage 1)."""
        idx = (order or self.order).indices(k)
        if self.dist is not None and not full:
            per = len(idx) // self.dist.world
            idx = idx[self.dist.rank * per: (self.dist.rank + 1) * per]
        return self.data.train[idx].to(self.device, non_blocking=True)

    # ---- parameters and optimizer ------------------------------------------------------------
    def _param_groups(self):
        model, t = self.model, self.cfg.train
        emb = set()
        for getter in ("get_input_embeddings", "get_output_embeddings"):
            m = getattr(model, getter, lambda: None)()
            if m is not None and getattr(m, "weight", None) is not None:
                emb.add(id(m.weight))
        latent = {id(m.weight) for m in binary_modules(model).values()}
        decay, no_decay, seen = [], [], set()
        for p in model.parameters():
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            if id(p) in emb and not t.train_embeddings:
                p.requires_grad_(False)
                continue
            (decay if id(p) in latent else no_decay).append(p)
        if self.cfg.binary.method == "fp":
            # full-precision fine-tuning: decay every matrix
            decay += [p for p in no_decay if p.dim() >= 2]
            no_decay = [p for p in no_decay if p.dim() < 2]
        return [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def _make_optimizer(self):
        t = self.cfg.train
        groups = self._param_groups()
        if not any(g["params"] for g in groups):
            raise BinaryLLMError("nothing to train: every parameter is frozen")
        kw = {"fused": True} if self.device.type == "cuda" else {}
        return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), **kw)

    # ---- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, kind: str | None = None, t: float | None = None, max_batches: int | None = None) -> float:
        """Mean next-token loss on the validation blocks with the given binarizer (default: current)."""
        model = self.model
        mods = list(binary_modules(model).values())
        saved = [(m.kind, m.t) for m in mods]
        if kind is not None:
            set_binarizer(model, kind, t if t is not None else (mods[0].t if mods else 1.0))
        was_training = model.training
        bs = self.cfg.train.batch_size
        limit = self.cfg.train.eval_batches if max_batches is None else max_batches
        blocks = self.data.val[: limit * bs] if limit else self.data.val
        total, count = window_nll(model, blocks, bs, self.device, self.autocast)
        for m, (k, tt) in zip(mods, saved):
            m.kind, m.t = k, tt
        model.train(was_training)
        return total / max(count, 1)

    # ---- outputs -------------------------------------------------------------------------------
    def _log(self, rec: dict) -> None:
        if self.out is None or not self.main:
            return
        with open(self.out / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(rec) + "\n")

    def _truncate_metrics(self, step: int) -> None:
        p = self.out / "metrics.jsonl" if (self.out and self.main) else None
        if p is None or not p.is_file():
            return
        keep = [ln for ln in p.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) < step]
        atomic_write_text(p, "".join(ln + "\n" for ln in keep))

    def _save(self, step: int, stage: str) -> None:
        if self.out is None:
            return
        info = getattr(self.model, "binaryllm_info", {})
        state = {"step": step, "stage": stage, "tokens": step * self.tokens_per_step,
                 "total_steps": self.total_steps, "input_scales": info.get("input_scales", []),
                 "folded_norms": info.get("folded_norms", []),
                 "folded_into_rows": info.get("folded_into_rows", []), "summary": self.summary}
        if self.dist is not None:
            from . import dist as D
            self.last_ckpt = D.save(self.out / "checkpoints", step, self.model, self.optimizer, state, self.dist,
                                    keep=self.cfg.train.keep_checkpoints)
            return
        self.last_ckpt = save_checkpoint(self.out / "checkpoints", step, self.model, self.optimizer, state,
                                         keep=self.cfg.train.keep_checkpoints)

    # ---- the run -------------------------------------------------------------------------------
    def run(self, resume: bool = False, callback=None) -> dict:
        # no KV cache during training and its evaluations: it is never reused, and a compiled block would
        # guard on each layer's cache state (recompiling per layer)
        hf_cfg = getattr(self.model, "config", None)
        use_cache = getattr(hf_cfg, "use_cache", None)
        if use_cache is not None:
            hf_cfg.use_cache = False
        try:
            return self._run(resume, callback)
        finally:
            if use_cache is not None:
                hf_cfg.use_cache = use_cache

    def _run(self, resume: bool, callback) -> dict:
        cfg, t = self.cfg, self.cfg.train
        model = self.model.to(self.device)
        if self.teacher is not None:
            self.teacher.to(self.device).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        model.train()
        torch.manual_seed(t.seed)
        start = 0
        self.last_ckpt = None
        ckpt = latest_checkpoint(self.out / "checkpoints") if (resume and self.out) else None
        if ckpt is not None:
            state = read_state(ckpt)
            restore_input_scales(self.model, state.get("input_scales", []), state.get("folded_norms", []),
                                 state.get("folded_into_rows", []))
            self._shard()
            if cfg.binary.method != "sign":
                self.optimizer = self._make_optimizer()
            if self.dist is not None:
                from . import dist as D
                D.load(ckpt, state, model, self.optimizer, self.dist)
            elif state.get("format") == "dcp":
                raise BinaryLLMError(f"{ckpt} is a sharded checkpoint of a {state.get('world_size')}-process run; "
                                     f"resume it with --gpus N (N >= 2; torch.distributed.checkpoint re-shards)")
            else:
                load_checkpoint(ckpt, model, self.optimizer)
            start = state["step"]
            self.summary = dict(state.get("summary", {}))
            self.last_ckpt = ckpt
            self._truncate_metrics(start)
        else:
            if self.out is not None:
                self._truncate_metrics(0)
            trains = cfg.binary.method in ("cpt", "ste", "irnet")
            if trains and cfg.binary.init and cfg.binary.init_steps > 0:
                self._stage1()
            self._shard()
            if cfg.binary.method != "sign":
                self.optimizer = self._make_optimizer()
            self._save(0, "train")
        if start >= self.total_steps:
            return self._finish()
        self._train(start, callback)
        return self._finish()

    def _shard(self) -> None:
        """Several ranks: FSDP2 over the decoder blocks and the root (after stage 1, which every rank runs
        identically on the whole model, as one GPU would)."""
        if self.dist is None:
            return
        from . import dist as D
        self.keep_names = D.untied_names(self.model)
        t = self.cfg.train
        if t.fsdp_params not in ("fp32", "bf16"):
            raise BinaryLLMError(f"--fsdp-params must be fp32 or bf16, got {t.fsdp_params!r}")
        D.shard(self.model, bf16=t.fsdp_params == "bf16" and self.device.type == "cuda", reshard=t.fsdp_reshard,
                device=self.device)

    def _stage1(self) -> None:
        b, t = self.cfg.binary, self.cfg.train
        order = BlockOrder(self.data.train.shape[0], t.batch_size, t.seed + 7919)
        set_binarizer(self.model, "sign", 1.0)
        probe = self.data.train[:1, : min(16, self.data.train.shape[1])].to(self.device)
        t0 = time.time()
        bar = self._bar(b.init_steps, "stage 1: init")
        res = binary_aware_init(self.model, lambda k: self.batch(k, order, full=True), b.init_steps, b.init_lr, probe,
                                fold=b.fold_input_scales, autocast=self.autocast,
                                loss_fn=lm_loss if t.fused_loss else None, accum=t.grad_accum,
                                log=lambda k, loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.3f}")))
        bar.close()
        p0 = self.plan(0)
        set_binarizer(self.model, p0.kind, p0.t)
        scales = res.pop("scales")
        self.summary["init"] = {**res, "scale_range": [round(min(v.min().item() for v in scales.values()), 4),
                                                       round(max(v.max().item() for v in scales.values()), 4)],
                                "seconds": round(time.time() - t0, 2),
                                "tokens": b.init_steps * t.batch_size * t.grad_accum * t.seq_len}
        for k, loss in enumerate(res["init_losses"]):
            self._log({"type": "init", "step": -b.init_steps + k, "loss": loss})

    def _bar(self, total: int, desc: str, initial: int = 0):
        from tqdm.auto import tqdm
        return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not self.progress,
                    dynamic_ncols=True)

    def _train(self, start: int, callback) -> None:
        cfg, t = self.cfg, self.cfg.train
        model, opt = self.model, self.optimizer
        params = [p for g in opt.param_groups for p in g["params"]]
        if t.compile and not getattr(model, "_binaryllm_compiled", False):
            compile_blocks(model)
            model._binaryllm_compiled = True
        end = self.total_steps if not t.max_steps else min(self.total_steps, start + t.max_steps)
        bar = self._bar(self.total_steps, f"{cfg.binary.method}", initial=start)
        win_t, win_tok, win_loss = time.time(), 0, []
        # losses stay on the device until a log, a checkpoint or the end: reading one back every step would make
        # the host wait for the GPU each step instead of queueing the next one
        pending: list[tuple[int, torch.Tensor]] = []
        last_loss = float("nan")
        prof = StepProfiler(t.profile, self.out, self.dist.rank if self.dist else 0, self.device.type == "cuda")
        fused = t.fused_loss and self.dist is None     # FSDP: the root's forward gathers the head
        teacher = self.teacher if t.distill else None
        if teacher is not None and t.compile and not getattr(teacher, "_binaryllm_compiled", False):
            compile_blocks(teacher)     # an eager teacher forward had made a distilled step ~2x a plain one
            teacher._binaryllm_compiled = True

        def check_losses() -> None:
            nonlocal last_loss
            if not pending:
                return
            vals = torch.stack([v for _, v in pending]).tolist()
            for (s, _), v in zip(pending, vals):
                if not math.isfinite(v):
                    where = f"the last good checkpoint is {self.last_ckpt}" if self.last_ckpt else "no checkpoint was saved"
                    raise BinaryLLMError(f"loss became {v} at step {s}; stopped, {where}: lower --lr "
                                         "(or raise --grad-clip protection) and continue with --resume")
            win_loss.extend(vals)
            last_loss = vals[-1]
            pending.clear()

        for step in range(start, end):
            plan = self.plan(step)
            if step == self.hard_start and step > 0 and cfg.binary.method == "cpt":
                f_loss = self.evaluate("cpt", plan.t)
                s_loss = self.evaluate("sign")
                self.summary["before_hard_phase"] = {"step": step, "val_loss_F": f_loss, "val_loss_sign": s_loss,
                                                     "gap": s_loss - f_loss}
                self._log({"type": "eval", "step": step, "val_loss_F": f_loss, "val_loss_sign": s_loss})
            set_binarizer(model, plan.kind, plan.t)
            prof.before(step)
            lr = self.lr(step)
            for g in opt.param_groups:
                g["lr"] = lr
            try:
                loss_sum = 0.0
                for micro in range(t.grad_accum):
                    ids = self.batch(step * t.grad_accum + micro)
                    with self.autocast():
                        loss = train_loss(model, ids, fused, teacher, t.distill_weight, t.distill_temp)
                    (loss / t.grad_accum).backward()
                    loss_sum = loss_sum + loss.detach().float()
                    del loss
                loss_dev = (loss_sum if self.dist is None else dist_mean(loss_sum, self.dist)) / t.grad_accum
                gnorm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip if t.grad_clip > 0 else float("inf"))
                if hasattr(gnorm, "full_tensor"):   # FSDP2: a DTensor
                    gnorm = gnorm.full_tensor()
                opt.step()
                opt.zero_grad(set_to_none=True)
            except torch.OutOfMemoryError:
                raise BinaryLLMError(f"out of memory at step {step} (batch-size {t.batch_size}, seq-len "
                                     f"{t.seq_len}): lower --batch-size (raise --grad-accum to keep the batch) "
                                     "or --seq-len") from None
            pending.append((step, loss_dev))
            win_tok += self.tokens_per_step
            done = step + 1
            last = done == end
            if self.deadline is not None and (self.dist is None or done % t.log_every == 0):
                over = time.time() > self.deadline
                last = last or (over if self.dist is None else dist_any_rank(over, self.dist))
            prof.after(step, last)
            if callback is not None or last or done % t.log_every == 0 or done % t.save_every == 0:
                check_losses()
            if done % t.log_every == 0 or last:
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                dt = max(time.time() - win_t, 1e-9)
                rec = {"type": "train", "step": step, "tokens": done * self.tokens_per_step, "phase": plan.phase,
                       "t": plan.t, "kind": plan.kind, "lr": lr, "loss": last_loss,
                       "loss_avg": sum(win_loss) / len(win_loss), "grad_norm": float(gnorm),
                       "tokens_per_s": win_tok / dt}
                self._log(rec)
                bar.set_postfix(phase=plan.phase, t=f"{plan.t:.3g}", loss=f"{rec['loss_avg']:.3f}",
                                tok_s=f"{rec['tokens_per_s']:.0f}")
                win_t, win_tok, win_loss = time.time(), 0, []
            bar.update(1)
            if t.eval_every and done % t.eval_every == 0 and done < self.total_steps:
                self._log({"type": "eval", "step": step, "val_loss": self.evaluate()})
            if done % t.save_every == 0 or last:
                self._save(done, "train")
            if self.dist is not None and os.environ.get("BINARYLLM_FAULT_RANK_STEP") == f"{self.dist.rank}:{done}":
                os._exit(17)   # fault injection for the multi-process tests: this rank dies here
            if callback is not None:
                callback(step, last_loss)
            if last:
                break
        bar.close()

    def _finish(self) -> dict:
        last = self.cfg.binary.method
        step = self.total_steps
        if self.out and self.last_ckpt is not None and read_state(self.last_ckpt)["step"] < step:
            return {"finished": False, "step": read_state(self.last_ckpt)["step"], "total_steps": step}
        plan = self.plan(max(step - 1, 0))
        res = {"finished": True, "method": last, "total_steps": step, "tokens": step * self.tokens_per_step}
        res["val_loss_sign"] = self.evaluate("sign") if last != "fp" else None
        if last == "cpt":
            res["t_final"] = plan.t
            res["val_loss_F"] = self.evaluate("cpt", plan.t)
            res["sign_gap"] = res["val_loss_sign"] - res["val_loss_F"]
        if last == "fp":
            res["val_loss_fp"] = self.evaluate("identity")
        set_binarizer(self.model, "sign" if last != "fp" else "identity", plan.t)
        self.summary.update(res)
        return self.summary
