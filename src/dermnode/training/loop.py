"""The one training loop of dermnode: :func:`fit` with per-task hooks.

Segmentation and classification differ in their data, loss and validation; everything else is shared here:
AdamW with weight decay on weights only (not on biases and normalisation parameters), a linear warm-up followed
by cosine decay (``torch.optim.lr_scheduler.SequentialLR`` of ``LinearLR`` and ``CosineAnnealingLR``), an
exponential moving average of the weights and buffers (``torch.optim.swa_utils.AveragedModel``) that is what
gets validated and exported, optional gradient clipping, an optional wall-clock budget, and a resumable
``checkpoint.pt`` written atomically after every epoch (model, EMA, optimiser, scheduler, history, best state).

A task implements :class:`Task`: ``batches`` yields the epoch's mini-batches, ``loss`` computes a scalar loss,
``validate`` scores the EMA model (higher is better) and ``on_best`` is told about every new best epoch
(segmentation exports there). Every random source is seeded from ``seed`` and the epoch number, so an
interrupted run resumed from its checkpoint continues as it would have.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from dermnode.errors import ModelError

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"


class Task(Protocol):
    """Per-task hooks of :func:`fit`."""

    def batches(self, epoch: int) -> Iterable[Any]:
        """The mini-batches of one epoch (deterministic for a given epoch)."""
        ...

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Scalar training loss of ``model`` (in train mode) on ``batch``."""
        ...

    def validate(self, model: nn.Module, epoch: int) -> tuple[float, dict[str, Any]]:
        """``(selection score, metrics)`` of the EMA ``model``; a higher score is better."""
        ...

    def on_best(self, model: nn.Module, epoch: int, metrics: dict[str, Any]) -> None:
        """Called with the EMA model after an epoch that improved the selection score."""
        ...


@dataclass(frozen=True)
class FitConfig:
    """Optimisation settings of :func:`fit`.

    ``warmup_steps`` steps of linear warm-up from ``lr / warmup_steps``, then cosine decay to
    ``lr * min_lr_fraction`` at the last planned step. ``ema_decay`` is the EMA decay per step.
    """

    epochs: int
    steps_per_epoch: int
    lr: float
    weight_decay: float
    warmup_steps: int
    ema_decay: float
    seed: int
    min_lr_fraction: float = 0.02
    grad_clip: float | None = None
    time_budget_s: float | None = None
    progress: str = "train"


@dataclass
class FitResult:
    """What :func:`fit` leaves: the EMA weights of the best epoch, the history and the best score."""

    best_state: dict[str, torch.Tensor] | None
    best_score: float
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def best_epoch(self) -> int:
        """1-based epoch of the best score (0 when no epoch ran)."""
        best = [h for h in self.history if h.get("score") == self.best_score]
        return int(best[0]["epoch"]) if best else 0


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _scheduler(
    optimizer: torch.optim.Optimizer, cfg: FitConfig, total_steps: int
) -> tuple[torch.optim.lr_scheduler.SequentialLR, torch.optim.lr_scheduler.CosineAnnealingLR]:
    """Linear warm-up then cosine decay; the cosine part is returned too (a time budget re-sizes it)."""
    warmup = max(1, cfg.warmup_steps)
    linear = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / warmup, end_factor=1.0, total_iters=warmup)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(1, total_steps - warmup), eta_min=cfg.lr * cfg.min_lr_fraction
    )
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [linear, cosine], milestones=[warmup]), cosine


def ema_state(ema: AveragedModel) -> dict[str, torch.Tensor]:
    """The averaged network's own state dict (without AveragedModel's ``module.`` prefix and counter)."""
    return {k: v.detach().clone() for k, v in ema.module.state_dict().items()}


def fit(
    model: nn.Module,
    task: Task,
    cfg: FitConfig,
    out_dir: Path,
    *,
    resume: bool = False,
    meta: Mapping[str, Any] | None = None,
) -> FitResult:
    """Train ``model`` with ``task``'s hooks; validate and keep the EMA weights of the best epoch.

    Parameters
    ----------
    model : torch.nn.Module
        The network (its initial weights: random, pretrained or fine-tuning start).
    task : Task
        Data, loss, validation and best-epoch hooks.
    cfg : FitConfig
        Optimisation settings.
    out_dir : Path
        Run folder: ``checkpoint.pt`` (resumable) and ``history.json``.
    resume : bool
        Continue from ``out_dir/checkpoint.pt`` when it exists (``cfg.epochs`` stays the total).
    meta : mapping, optional
        Further values stored at the top level of the checkpoint (architecture, input size ...), for tools that
        export a model from it.

    Returns
    -------
    FitResult
        Best EMA state, best score and per-epoch history (``epoch``, ``train_loss``, ``lr``, ``score``,
        ``seconds`` and the task's metrics).

    Raises
    ------
    ModelError
        When the checkpoint cannot be resumed.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr)
    planned = cfg.epochs  # shrinks to fit cfg.time_budget_s
    scheduler, cosine = _scheduler(optimizer, cfg, planned * cfg.steps_per_epoch)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    result = FitResult(best_state=None, best_score=-math.inf)
    start_epoch, elapsed = 0, 0.0
    ckpt_path = out_dir / CHECKPOINT
    if resume and ckpt_path.is_file():
        try:
            ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
            model.load_state_dict(ck["model"])
            ema.load_state_dict(ck["ema"])
            optimizer.load_state_dict(ck["optimizer"])
            scheduler.load_state_dict(ck["scheduler"])
            result = FitResult(ck["best_state"], float(ck["best_score"]), list(ck["history"]))
            start_epoch, elapsed = int(ck["epoch"]), float(ck.get("elapsed_s", 0.0))
            # cfg.epochs is the requested total; a time budget cuts it again with all the time spent so far
            if cfg.time_budget_s is not None and elapsed > 0 and start_epoch > 0:
                planned = max(start_epoch, min(cfg.epochs, int(cfg.time_budget_s / (elapsed / start_epoch))))
            cosine.T_max = max(1, planned * cfg.steps_per_epoch - max(1, cfg.warmup_steps))
        except (OSError, KeyError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
            raise ModelError(f"cannot resume from {ckpt_path}: {exc}") from exc
        logger.info("resuming after epoch %d (best score %.4f)", start_epoch, result.best_score)
    epoch = start_epoch
    while epoch < planned:
        t0 = time.time()
        torch.manual_seed(cfg.seed * 1000 + epoch)
        model.train()
        losses: list[float] = []
        bar: Iterator[Any] = tqdm(task.batches(epoch), total=cfg.steps_per_epoch, mininterval=20,
                                  desc=f"{cfg.progress} epoch {epoch + 1}/{planned}")
        for batch in bar:
            loss = task.loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            ema.update_parameters(model)
            losses.append(float(loss.detach()))
        ema.eval()
        score, metrics = task.validate(ema.module, epoch)
        elapsed += time.time() - t0
        if cfg.time_budget_s is not None:
            fit_epochs = int(cfg.time_budget_s / max(elapsed / (epoch + 1), 1e-9))
            new_plan = max(epoch + 1, min(planned, fit_epochs))  # only ever shrinks
            if new_plan != planned:
                planned = new_plan
                # the cosine decay is stretched or shrunk to end with the last epoch
                cosine.T_max = max(1, planned * cfg.steps_per_epoch - max(1, cfg.warmup_steps))
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": sum(losses) / max(len(losses), 1),
            "lr": float(scheduler.get_last_lr()[0]),
            "score": score,
            "seconds": round(time.time() - t0, 1),
            **metrics,
        }
        result.history.append(record)
        improved = score > result.best_score
        if improved:
            result.best_score = score
            result.best_state = ema_state(ema)
            task.on_best(ema.module, epoch, metrics)
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save(
            {
                "model": model.state_dict(),
                "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "history": result.history,
                "best_score": result.best_score,
                "best_state": result.best_state,
                "epoch": epoch + 1,
                "planned_epochs": planned,
                "elapsed_s": elapsed,
                "epochs": cfg.epochs,
                **dict(meta or {}),
            },
            tmp,
        )
        tmp.replace(ckpt_path)
        (out_dir / "history.json").write_text(json.dumps(result.history, indent=1) + "\n", encoding="utf-8")
        logger.info("epoch %d/%d loss %.4f score %.4f (%.0f s)%s", epoch + 1, planned, record["train_loss"], score,
                    record["seconds"], " *best*" if improved else "")
        epoch += 1
    return result
