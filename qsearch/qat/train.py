"""The training loop: knowledge distillation from the FP32 model's outputs on the calibration and
search inputs (no labels), Adam on the layers' weights and biases (and the activation ranges when
they learn), early stopping on the search metric of the *exported QDQ model* scored by the engine
(the metric that decides is the one that ships). The best checkpoint is kept from epoch 0 (the
plan as it was) on; an interrupt, a time limit or a NaN loss stops with it."""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from qsearch.errors import QsearchError
from qsearch.qat.export import Checkpoint
from qsearch.qat.mirror import Mirror

RELATIVE_EPS = 1e-12
DIVERGED = 1.5  # an epoch whose mean loss exceeds the best checkpoint's by this factor diverged
BACKOFF = 0.1  # ...then training goes on from the best checkpoint at this times the learning rate
MAX_BACKOFFS = 2


@dataclass(frozen=True)
class Settings:
    epochs: int = 30
    lr: float = 1e-3
    range_lr: float | None = None  # None: the weights' lr
    learn_ranges: bool = True  # LSQ-style learned activation ranges; False: the plan's, fixed (STE)
    patience: int = 6  # epochs without a better search score before stopping
    seed: int = 0
    loss: str | None = None  # 'pkg.module:fn' (student outputs, teacher outputs) -> scalar tensor

    def as_dict(self) -> dict:
        return {"epochs": self.epochs, "lr": self.lr, "range_lr": self.range_lr or self.lr,
                "learn_ranges": self.learn_ranges, "patience": self.patience, "seed": self.seed,
                **({"loss": self.loss} if self.loss else {})}


@dataclass(frozen=True)
class Epoch:
    epoch: int
    loss: float  # mean training loss of the epoch (epoch 0: the loss before training)
    search: float  # the exported QDQ model's search score
    seconds: float


@dataclass(frozen=True)
class History:
    epochs: tuple[Epoch, ...]
    best: Checkpoint
    stopped: str  # why training ended: "epochs", "early stop", "timeout", "interrupted", "nan loss"


def check_settings(s: Settings) -> None:
    if isinstance(s.epochs, bool) or not isinstance(s.epochs, int) or s.epochs <= 0:
        raise QsearchError(f"--epochs must be a whole number >= 1, got {s.epochs!r}")
    for key, v in (("--lr", s.lr), ("--range-lr", s.range_lr)):
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise QsearchError(f"{key} must be a finite number > 0, got {v!r}")


def distillation(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """Each output's squared error relative to the FP32 output's power, summed: scale-free, so a
    model whose outputs differ in magnitude weighs each the same."""
    total = torch.zeros(())
    for s, t in zip(student, teacher):
        if not (s.is_floating_point() and t.is_floating_point()):
            continue
        total = total + torch.mean((s - t) ** 2) / (torch.mean(t ** 2) + RELATIVE_EPS)
    return total


def user_loss(entry: str) -> Callable:
    module, _, name = entry.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except Exception as exc:
        raise QsearchError(f"--loss {entry}: cannot import it: {type(exc).__name__}: {exc}"[:300]) from None
    if not callable(fn):
        raise QsearchError(f"--loss {entry}: not a function")

    def checked(student, teacher):
        try:
            v = fn(student, teacher)
        except Exception as exc:
            raise QsearchError(f"--loss {entry} raised {type(exc).__name__}: {exc}"[:300]) from None
        if not isinstance(v, torch.Tensor) or v.numel() != 1 or not v.is_floating_point():
            raise QsearchError(f"--loss {entry} returned {type(v).__name__}"
                               f"{tuple(v.shape) if isinstance(v, torch.Tensor) else ''}, not a scalar float tensor")
        return v.reshape(())
    return checked


class Trainer:
    """One fine-tuning run. `score(checkpoint) -> search score` exports and scores through the
    engine; `on_best(checkpoint, score)` writes the outputs (so an interrupt keeps them)."""

    def __init__(self, mirror: Mirror, batches: Sequence[Mapping[str, np.ndarray]],
                 teacher: Sequence[Sequence[np.ndarray]], settings: Settings):
        self.mirror, self.settings = mirror, settings
        self.batches = [{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in b.items() if k in mirror.inputs}
                        for b in batches]
        self.teacher = [[torch.from_numpy(np.asarray(t)) for t in outs] for outs in teacher]
        self.loss_fn = user_loss(settings.loss) if settings.loss else distillation
        weights = list(mirror.params.values())
        ranges = [q.bounds for q in mirror.quantizers.values() if q.learn]
        ranges = list({id(p): p for p in ranges}.values())  # shared-scale groups hold one
        groups = [{"params": weights, "lr": settings.lr}]
        if ranges:
            groups.append({"params": ranges, "lr": settings.range_lr or settings.lr})
        self.optimizer = torch.optim.Adam(groups)
        self.generator = np.random.default_rng(settings.seed)

    def checkpoint(self, epoch: int, loss: float) -> Checkpoint:
        return Checkpoint(epoch, self.mirror.values(), self.mirror.ranges(), loss)

    def back_to(self, ck: Checkpoint) -> None:
        """The mirror as it was at `ck`, and every learning rate times BACKOFF (Adam's moments reset)."""
        self.mirror.load(ck.values, ck.ranges)
        groups = [{"params": g["params"], "lr": g["lr"] * BACKOFF} for g in self.optimizer.param_groups]
        self.optimizer = torch.optim.Adam(groups)

    def initial_loss(self) -> float:
        """The loss before training (a user's loss function is checked here, before any output)."""
        with torch.no_grad():
            return float(np.mean([float(self.loss_fn(self.mirror(b), t)) for b, t in zip(self.batches, self.teacher)]))

    def epoch(self, progress: Callable[[int], None], deadline: float | None) -> tuple[float, str | None]:
        """One pass over the batches in a fresh order. Returns (mean loss, why it stopped early)."""
        losses = []
        for k, i in enumerate(self.generator.permutation(len(self.batches))):
            if deadline is not None and time.monotonic() > deadline:
                return _mean(losses), "timeout"
            loss = self.loss_fn(self.mirror(self.batches[i]), self.teacher[i])
            if not torch.isfinite(loss):
                return _mean(losses), "nan loss"
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            losses.append(float(loss.detach()))
            progress(k + 1)
        return _mean(losses), None

    def run(self, score: Callable[[Checkpoint], float], on_best: Callable[[Checkpoint, float], None],
            progress: Callable[[int, int, str], None], deadline: float | None = None,
            log: Callable[[str], None] = print) -> History:
        s = self.settings
        t0 = time.perf_counter()
        best = self.checkpoint(0, self.initial_loss())
        best_score = score(best)
        on_best(best, best_score)
        history = [Epoch(0, best.loss, best_score, time.perf_counter() - t0)]
        log(f"epoch 0 (the plan as it was): loss {best.loss:.4g}, search {best_score:.4f}")
        stopped, since, backoffs = "epochs", 0, 0
        n = len(self.batches)
        try:
            for e in range(1, s.epochs + 1):
                t1 = time.perf_counter()
                loss, why = self.epoch(lambda k, e=e: progress((e - 1) * n + k, s.epochs * n,
                                                                 f"epoch {e}/{s.epochs}"), deadline)
                if why is not None:
                    stopped = why
                    break
                ck = self.checkpoint(e, loss)
                value = score(ck)
                history.append(Epoch(e, loss, value, time.perf_counter() - t1))
                # a tie on a coarse search split goes to the epoch closer to FP32 by the (finer) distillation loss
                better = value > best_score or (value == best_score and loss < best.loss)
                log(f"epoch {e}: loss {loss:.4g}, search {value:.4f}" + (" (best)" if better else ""))
                if better:
                    best, best_score, since = ck, value, 0
                    on_best(best, best_score)
                else:
                    since += 1
                    if loss > DIVERGED * best.loss and backoffs < MAX_BACKOFFS:  # too high a rate: step back
                        backoffs += 1
                        self.back_to(best)
                        log(f"epoch {e}: the loss rose to {loss:.4g} from {best.loss:.4g}: back to epoch {best.epoch}'s "
                            f"weights, learning rate x{BACKOFF:g}")
                    if since >= s.patience:
                        stopped = "early stop"
                        break
        except KeyboardInterrupt:
            stopped = "interrupted"
        return History(tuple(history), best, stopped)


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")
