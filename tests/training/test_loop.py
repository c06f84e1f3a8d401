"""The shared training loop: it learns, keeps the best EMA weights, and resumes exactly where it stopped."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from dermnode.errors import ModelError
from dermnode.training.loop import FitConfig, fit


class LinearTask:
    """Fit y = 3 x0 - 2 x1 + 1 with a linear layer; validation score = -MSE on held-out points."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 2, generator=g)
        self.y = self.x @ torch.tensor([3.0, -2.0]) + 1.0
        self.vx = torch.randn(32, 2, generator=g)
        self.vy = self.vx @ torch.tensor([3.0, -2.0]) + 1.0
        self.best_calls: list[int] = []

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(64, generator=torch.Generator().manual_seed(epoch))
        for i in range(0, 64, 16):
            idx = order[i : i + 16]
            yield self.x[idx], self.y[idx]

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return ((model(x)[:, 0] - y) ** 2).mean()

    def validate(self, model: nn.Module, epoch: int) -> tuple[float, dict[str, Any]]:
        with torch.no_grad():
            mse = float(((model(self.vx)[:, 0] - self.vy) ** 2).mean())
        return -mse, {"val_mse": mse}

    def on_best(self, model: nn.Module, epoch: int, metrics: dict[str, Any]) -> None:
        self.best_calls.append(epoch)


CFG = FitConfig(epochs=6, steps_per_epoch=4, lr=0.2, weight_decay=0.0, warmup_steps=2, ema_decay=0.5, seed=3)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(2, 1)


def test_fit_learns_and_keeps_the_best_ema_state(tmp_path: Path) -> None:
    task = LinearTask()
    model = _model()
    _, before = task.validate(model, 0)
    result = fit(model, task, CFG, tmp_path)
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4, 5, 6]
    assert result.history[-1]["val_mse"] < 0.05 * before["val_mse"]
    assert result.best_score == max(h["score"] for h in result.history)
    assert task.best_calls and task.best_calls[-1] == result.best_epoch - 1
    best = nn.Linear(2, 1)
    assert result.best_state is not None
    best.load_state_dict(result.best_state)
    assert task.validate(best, 0)[0] == pytest.approx(result.best_score)
    # warm-up then cosine decay to lr * min_lr_fraction at the last step
    lrs = [h["lr"] for h in result.history]
    assert lrs[0] > lrs[-1] == pytest.approx(CFG.lr * CFG.min_lr_fraction, rel=1e-3)


def test_interrupted_run_resumes_to_the_same_weights(tmp_path: Path) -> None:
    straight = fit(_model(), LinearTask(), CFG, tmp_path / "straight")

    class TrainingInterruptedError(Exception):
        pass

    class Stopping(LinearTask):
        def validate(self, model: nn.Module, epoch: int) -> tuple[float, dict[str, Any]]:
            if epoch == 3:  # dies during epoch 4, after the checkpoint of epoch 3
                raise TrainingInterruptedError
            return super().validate(model, epoch)

    with pytest.raises(TrainingInterruptedError):
        fit(_model(), Stopping(), CFG, tmp_path / "cut")
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)["epoch"] == 3
    resumed = fit(nn.Linear(2, 1), LinearTask(), CFG, tmp_path / "cut", resume=True)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4, 5, 6]
    assert [h["val_mse"] for h in resumed.history] == pytest.approx([h["val_mse"] for h in straight.history])
    assert straight.best_state is not None and resumed.best_state is not None
    for k, v in straight.best_state.items():
        assert torch.allclose(v, resumed.best_state[k]), k


def test_unreadable_checkpoint_is_a_model_error(tmp_path: Path) -> None:
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot resume"):
        fit(_model(), LinearTask(), CFG, tmp_path, resume=True)
