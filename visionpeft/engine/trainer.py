"""The training engine: one code path for every method, one process or many (torchrun).

Plain PyTorch with timm conventions: AdamW with parameter groups, cosine schedule with warm-up in
optimizer steps, gradient accumulation and clipping, mixed precision, optional EMA, deterministic
seeding, DDP with exactly-once sharded evaluation, atomic checkpoints with exact resume (at epoch
boundaries), JSONL / TensorBoard logs and a ``results.json`` per run.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._io import save_json
from .checkpoint import config_differences, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .distributed import GlobalBatchSampler, ShardSampler, all_reduce_sum, barrier, init_distributed
from .experiment import ExperimentConfig
from .optim import EMA, lr_factor, param_groups, set_lr
from .tasks import make_task

CKPT_NAME = "last.ckpt"


# what a run folder holds besides config.yaml; --restart removes these
RUN_OUTPUTS = (CKPT_NAME, "log.jsonl", "results.json", "tb", "adapter")


class NonFiniteLossError(RuntimeError):
    """The loss, a parameter or the evaluation loss became NaN or infinite; the run stopped and the last
    checkpoint written from a finite state was kept."""


class RunExistsError(ValueError):
    """The run folder already holds a checkpoint, and neither ``resume`` nor ``restart`` was given."""


def json_safe(value: Any) -> Any:
    """``value`` with every NaN / infinite float replaced by ``None``, so that strict JSON parsers read it."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def json_line(record: dict[str, Any]) -> str:
    """One line of ``log.jsonl``: strict JSON (non-finite numbers become ``null``)."""
    return json.dumps(json_safe(record), allow_nan=False)


def error_message(e: BaseException) -> str:
    """The message of ``e`` for the user, with its notes. An error re-raised by a DataLoader worker carries
    the worker's whole traceback as its message: it is reduced to the last line, the original exception
    (which names the unreadable file)."""
    text = str(e)
    if "Original Traceback" in text:
        lines = [line for line in text.strip().splitlines() if line.strip()]
        text = lines[-1] if lines else text
    return "\n".join([text, *getattr(e, "__notes__", [])])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


@torch.no_grad()
def evaluation_sums(
    model: nn.Module, loader: Any, device: torch.device, autocast: Any = contextlib.nullcontext
) -> torch.Tensor:
    """(correct, count, summed loss) of ``model`` in eval mode over ``loader``; reduce across ranks, then
    :func:`summarize`."""
    model.eval()
    stats = torch.zeros(3, dtype=torch.float64)
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with autocast():
            logits = model(x)
        stats[0] += (logits.argmax(-1) == y).sum().item()
        stats[1] += y.numel()
        stats[2] += F.cross_entropy(logits.float(), y, reduction="sum").item()
    return stats


def summarize(stats: torch.Tensor) -> dict[str, float]:
    n = max(stats[1].item(), 1.0)
    return {
        "top1": 100.0 * stats[0].item() / n,
        "eval_loss": stats[2].item() / n,
        "eval_samples": int(stats[1].item()),
    }


class Trainer:
    """Train and evaluate one adapted model as described by an :class:`ExperimentConfig`.

    A run folder that already holds a checkpoint is continued only when asked (``resume``) or started
    over only when asked (``restart``); otherwise :class:`RunExistsError` is raised, so that running a
    command twice never replaces a later checkpoint with an earlier one.

    Args:
        cfg: the resolved experiment config.
        resume: a ``last.ckpt`` to continue from (its config must match, paths aside).
        progress: show a progress bar on an interactive terminal (rank 0).
        restart: start over in a run folder that holds a checkpoint (its checkpoint, logs, results and
            adapter are deleted).
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        resume: str | Path | None = None,
        progress: bool = True,
        restart: bool = False,
    ) -> None:
        self.cfg = cfg
        rt = cfg.runtime
        if rt.threads:
            torch.set_num_threads(rt.threads)
        dev = rt.device if rt.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        if dev == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("runtime.device=cuda but CUDA is not available; use runtime.device=cpu or auto")
        self.rank, self.world, local = init_distributed(dev)
        self.device = torch.device(f"cuda:{local}" if dev == "cuda" else "cpu")
        self.main = self.rank == 0
        self.out = Path(rt.out_dir)
        self.progress = progress and self.main and sys.stderr.isatty()
        if resume is not None and restart:
            raise ValueError("resume and restart exclude each other: continue a run, or start it over")
        self._prepare_run_folder(resume is not None, restart)
        self.last_good: tuple[Path, int] | None = None  # the newest checkpoint written from a finite state
        seed_everything(rt.seed)

        # the task (classification, segmentation, detection) builds the data and the model, and computes the loss
        # and the metrics; ``self.task`` is the dataset's name (VTAB task, folder name)
        self.kind = make_task(cfg)
        self.train_set, self.eval_set, self.num_classes, self.task = self.kind.datasets()
        self.peft = self.kind.build_model(self.num_classes).to(self.device)
        self.model: nn.Module = self.peft
        self._trainable = [p for p in self.peft.parameters() if p.requires_grad]
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            if self.device.type == "cuda":  # dense heads normalise over the global batch, as mmseg's SyncBN
                self.kind.sync_batchnorm(self.peft)
            self.model = nn.parallel.DistributedDataParallel(self.peft, device_ids=ids)

        d, o = cfg.data, cfg.optimizer
        self.sampler = GlobalBatchSampler(len(self.train_set), d.batch_size, self.rank, self.world, rt.seed)
        pin = self.device.type == "cuda"
        workers = dict(num_workers=d.num_workers, pin_memory=pin, persistent_workers=d.num_workers > 0)
        self.train_loader = torch.utils.data.DataLoader(
            self.train_set,
            batch_sampler=self.sampler,
            generator=torch.Generator().manual_seed(rt.seed + self.rank),
            collate_fn=self.kind.collate(train=True),
            **workers,
        )
        self.eval_loader = torch.utils.data.DataLoader(
            self.eval_set,
            batch_size=max(1, d.batch_size // self.world),
            sampler=ShardSampler(len(self.eval_set), self.rank, self.world),
            generator=torch.Generator().manual_seed(rt.seed),
            collate_fn=self.kind.collate(train=False),
            **workers,
        )
        self.optimizer = torch.optim.AdamW(
            param_groups(self.peft, o.lr, o.weight_decay, o.head_lr), betas=tuple(o.betas)
        )
        # a last group shorter than grad_accum micro-batches is an optimizer step too
        self.steps_per_epoch = max(1, -(-len(self.sampler) // o.grad_accum))
        self.total_steps = cfg.schedule.epochs * self.steps_per_epoch
        self.warmup_steps = cfg.schedule.warmup_epochs * self.steps_per_epoch
        self.min_ratio = cfg.schedule.min_lr / o.lr if o.lr > 0 else 0.0
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[rt.amp]
        self.scaler = torch.amp.GradScaler("cuda") if rt.amp == "fp16" and self.device.type == "cuda" else None
        self.ema = EMA(self.peft, rt.ema) if rt.ema else None
        self.epoch, self.step, self.history = 0, 0, []
        self._tb = None
        if resume is not None:
            self._resume(Path(resume))

    @property
    def mixup(self) -> Any:
        """Mixup / cutmix of classification training batches (``None``: off); evaluation never mixes."""
        return self.kind.mixup

    @mixup.setter
    def mixup(self, value: Any) -> None:
        self.kind.mixup = value

    # checkpoints ---------------------------------------------------------------------------------
    def _prepare_run_folder(self, resuming: bool, restart: bool) -> None:
        """Refuse to overwrite a run folder's checkpoint unless resuming; ``restart`` clears the folder."""
        ckpt = self.out / CKPT_NAME
        exists = ckpt.exists()
        barrier()  # every rank has looked before rank 0 deletes anything
        if exists and not resuming and not restart:
            raise RunExistsError(
                f"the run folder {self.out} already holds a checkpoint ({ckpt}, epoch "
                f"{self.epoch_of_checkpoint(ckpt)}); continue it with --resume {ckpt}, or start over with "
                "--restart (deletes its checkpoint, logs and results), or choose another --out"
            )
        if restart and self.main:
            for name in RUN_OUTPUTS:
                path = self.out / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                elif path.exists() or path.is_symlink():
                    path.unlink()
        barrier()

    def _state(self) -> dict[str, Any]:
        return {
            "format": 1,
            "epoch": self.epoch,
            "step": self.step,
            "trainable": {k: v.detach().cpu() for k, v in self.peft.adapter_state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "ema": self.ema.state_dict() if self.ema else None,
            "rng": rng_state(),
            "history": json.dumps(json_safe(self.history), allow_nan=False),
            "config": self.cfg.to_dict(),
        }

    def _resume(self, path: Path) -> None:
        state = load_checkpoint(path)
        defaults = ExperimentConfig(method=self.cfg.method).to_dict()  # for keys older checkpoints lack
        diffs = config_differences(state.get("config", {}), self.cfg.to_dict(), defaults)
        if diffs:
            raise ValueError(f"resume checkpoint {path} was written by another config: " + "; ".join(diffs))
        with torch.no_grad():
            target = self.peft.adapter_state_dict()
            missing = sorted(set(target) - set(state["trainable"]))
            if missing:
                raise ValueError(f"resume checkpoint {path} lacks tensors {missing[:3]}")
            for k, v in target.items():
                v.copy_(state["trainable"][k])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        set_rng_state(state["rng"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.history = json.loads(state.get("history", "[]"))
        self.last_good = (path, self.epoch)
        self._log({"event": "resume", "from": str(path), "epoch": self.epoch, "step": self.step})

    def save_checkpoint(self, sync: bool = True) -> None:
        """Write ``last.ckpt`` (rank 0; with ``sync=False`` the calling rank, without a barrier: for the
        error path, where the other ranks may not reach a barrier). Called only from a finite state."""
        path = self.out / CKPT_NAME
        if self.main or not sync:
            save_checkpoint(path, self._state())
        self.last_good = (path, self.epoch)
        if sync:
            barrier()

    def _non_finite(self, what: str) -> NonFiniteLossError:
        """Log the event and build the error that names the last good checkpoint."""
        self._log({"event": "non_finite", "what": what, "epoch": self.epoch + 1, "step": self.step})
        if self.last_good is None:
            where = "none written yet (the run folder holds no checkpoint of this run)"
        else:
            where = f"{self.last_good[0]} (epoch {self.last_good[1]})"
        return NonFiniteLossError(
            f"{what}; the run stopped. Last good checkpoint: {where}. Lower optimizer.lr or set optimizer.clip_grad."
        )

    # logging -------------------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "log.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json_line(record) + "\n")
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out / "tb"))
            except Exception:  # noqa: BLE001 - tensorboard is optional
                self._tb = False
        if self._tb:
            for k, v in record.items():
                if isinstance(v, (int, float)) and math.isfinite(v) and k not in ("epoch", "step"):
                    self._tb.add_scalar(k, v, record.get("step", self.step))

    # training ------------------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_epoch(self) -> float:
        cfg = self.cfg
        self.model.train()
        self.sampler.set_epoch(self.epoch)
        accum = cfg.optimizer.grad_accum
        n_batches = len(self.sampler)
        seen, loss_sum, t0 = 0, 0.0, time.perf_counter()
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=n_batches, desc=f"epoch {self.epoch + 1}/{cfg.schedule.epochs}", leave=False)
        for i, batch in enumerate(self.train_loader):
            batch = self.kind.to_device(batch, self.device)
            sync = (i + 1) % accum == 0 or i + 1 == n_batches
            ctx = self.model.no_sync() if (self.world > 1 and not sync) else contextlib.nullcontext()
            with ctx:
                loss = self.kind.loss(self.model, batch, self._autocast)
                global_loss = all_reduce_sum(loss.detach().clone()) / self.world
                if not torch.isfinite(global_loss):
                    raise self._non_finite(
                        f"non-finite loss {global_loss.item()} at epoch {self.epoch + 1}, step {self.step}"
                    )
                scaled = loss / min(accum, n_batches - i // accum * accum)  # mean over this step's micro-batches
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            if sync:
                self._optimizer_step()
            seen += self.kind.batch_size(batch) * self.world
            loss_sum += global_loss.item()
            rate = seen / max(time.perf_counter() - t0, 1e-9)
            if bar is not None:
                bar.set_postfix(loss=f"{global_loss.item():.4f}", img_s=f"{rate:.0f}")
                bar.update()
            if (i + 1) % max(1, cfg.runtime.log_every) == 0 or i + 1 == n_batches:
                lr = self.optimizer.param_groups[0]["lr"]
                rec = {
                    "epoch": self.epoch + 1,
                    "step": self.step,
                    "loss": global_loss.item(),
                    "lr": lr,
                    "img_per_s": rate,
                }
                self._log(rec)
                if self.main and bar is None and (i + 1) % max(1, cfg.runtime.log_every) == 0:
                    left = (n_batches - i - 1) * (time.perf_counter() - t0) / (i + 1)
                    print(
                        f"epoch {self.epoch + 1}/{cfg.schedule.epochs} batch {i + 1}/{n_batches} "
                        f"loss {global_loss.item():.4f} lr {lr:.2e} {rate:.0f} img/s eta(epoch) {left:.0f}s",
                        flush=True,
                    )
        if bar is not None:
            bar.close()
        return loss_sum / max(1, n_batches)

    def _optimizer_step(self) -> None:
        o = self.cfg.optimizer
        if o.clip_grad:
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in self.peft.parameters() if p.requires_grad], o.clip_grad)
        sched = self.cfg.schedule
        factor = lr_factor(self.step, self.total_steps, self.warmup_steps, self.min_ratio, sched.name, sched.power)
        set_lr(self.optimizer, factor)
        try:
            if self.scaler:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
        except RuntimeError as e:  # AdamW's step size itself overflows float32 with an absurd lr
            if "overflow" not in str(e):
                raise
            raise self._non_finite(f"optimizer step {self.step} overflowed ({e})") from None
        self.optimizer.zero_grad(set_to_none=True)
        self._check_parameters()
        self.step += 1
        if self.ema:
            self.ema.update(self.peft)

    @torch.no_grad()
    def _check_parameters(self) -> None:
        """Stop when an optimizer step left a trainable parameter NaN or infinite (one device sync)."""
        if not self._trainable or torch.stack([torch.isfinite(p).all() for p in self._trainable]).all():
            return
        bad = [n for n, p in self.peft.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise self._non_finite(
            f"non-finite parameters after optimizer step {self.step + 1} (epoch {self.epoch + 1}): "
            f"{', '.join(bad[:3])}{more}"
        )

    @staticmethod
    def epoch_of_checkpoint(path: Path) -> int | str:
        try:
            return int(load_checkpoint(path)["epoch"])
        except Exception:  # noqa: BLE001
            return "?"

    def evaluate(self) -> dict[str, float]:
        """The task's metrics over the evaluation split, every sample counted once (classification: top-1
        accuracy in percent and mean loss; segmentation: mIoU / mAcc / aAcc; detection: COCO mAP)."""
        if self.ema:
            self.ema.swap(self.peft)
        try:
            metrics = self.kind.evaluate(self.peft, self.eval_loader, self.device, self._autocast)
        finally:
            if self.ema:
                self.ema.swap(self.peft)
        if "eval_loss" in metrics and not math.isfinite(metrics["eval_loss"]):
            raise self._non_finite(f"non-finite evaluation loss {metrics['eval_loss']} after epoch {self.epoch}")
        return metrics

    def fit(self, max_epochs: int | None = None) -> dict[str, Any]:
        """Train until ``schedule.epochs`` (or ``max_epochs`` more epochs), evaluating and checkpointing.

        A checkpoint is written every ``runtime.ckpt_every`` epochs, at the last epoch and whenever the run
        stops early (``max_epochs``), always from a finite state: a non-finite loss, parameter or evaluation
        loss stops the run before its epoch is checkpointed. When the evaluation fails for another reason
        (an unreadable image), the epoch's trained state is checkpointed before the error is passed on.
        """
        if max_epochs is not None and max_epochs < 1:
            raise ValueError(f"max_epochs must be >= 1, got {max_epochs}")
        cfg, rt = self.cfg, self.cfg.runtime
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
        t0 = time.perf_counter()
        stop = cfg.schedule.epochs if max_epochs is None else min(cfg.schedule.epochs, self.epoch + max_epochs)
        metrics: dict[str, Any] = {}
        while self.epoch < stop:
            train_loss = self.train_epoch()
            self.epoch += 1
            last = self.epoch == cfg.schedule.epochs
            rec = {"epoch": self.epoch, "step": self.step, "train_loss": train_loss}
            if last or self.epoch % rt.eval_every == 0:
                metrics = self._evaluate_or_keep(rec)
                rec.update({k: v for k, v in metrics.items() if k != "per_class_IoU"})
            self.history.append(rec)
            self._log(rec)
            if self.main:
                key = self.kind.main_metric
                extra = f" {key} {metrics[key]:.2f}" if key in rec else ""
                print(f"epoch {self.epoch}/{cfg.schedule.epochs} train_loss {train_loss:.4f}{extra}", flush=True)
            if last or self.epoch % rt.ckpt_every == 0 or self.epoch == stop:
                self.save_checkpoint()
        result = self.finish(time.perf_counter() - t0) if self.epoch == cfg.schedule.epochs else {}
        return result

    def _evaluate_or_keep(self, rec: dict[str, Any]) -> dict[str, float]:
        """:meth:`evaluate`; if it fails for a reason other than a non-finite loss, checkpoint the epoch's
        (finite) trained state first, so that the training is not lost, then re-raise with a note."""
        try:
            return self.evaluate()
        except NonFiniteLossError:
            raise
        except Exception as e:
            self.history.append(rec)
            self._log({**rec, "event": "evaluation_failed", "error": str(e).strip().splitlines()[-1][:500]})
            self.save_checkpoint(sync=False)  # the other ranks may be waiting in the evaluation
            ck = self.out / CKPT_NAME
            e.add_note(
                f"The evaluation after epoch {self.epoch} failed; the trained state of that epoch was saved to "
                f"{ck}: fix the problem, then continue with --resume {ck}"
            )
            raise

    def finish(self, seconds: float) -> dict[str, Any]:
        """Evaluate the final weights, save the adapter and ``results.json``."""
        metrics = self.evaluate()
        trainable, total = self.peft.get_nb_trainable_parameters()
        result = {
            "task": self.task,
            "kind": self.kind.name,
            "method": self.cfg.method.method,
            "model": self.cfg.model.name,
            "metric": self.kind.main_metric,
            **metrics,
            "trainable_params": trainable,
            "total_params": total,
            **self.kind.result_extras(self.peft),  # dense, SAM: the adapter's own parameter count
            "epochs": self.epoch,
            "steps": self.step,
            "seconds": seconds,
            "world_size": self.world,
            "config": self.cfg.to_dict(),
        }
        if self.main:
            if self.ema:
                self.ema.swap(self.peft)
            self.peft.save_adapter(self.out / "adapter")
            classes = self.kind.classes
            if (
                classes and self.kind.name == "classification"
            ):  # class names of ImageFolder / CSV data, for tools/predict.py
                save_json(self.out / "adapter" / "classes.json", list(classes))
            if self.ema:
                self.ema.swap(self.peft)
            save_json(self.out / "results.json", result)
            if self._tb:
                self._tb.close()
        barrier()
        return result
