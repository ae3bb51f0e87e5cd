"""The fast path: several optimiser steps per Lightning batch (data.steps_per_call > 1, the default 64).

Lightning's per-batch work (fetching, hooks, the progress bar, logging, the optimizer wrapper) costs a
fixed time per batch that is large next to one step of a small MLP on a CPU; Lightning closed that
overhead as won't-fix (Lightning-AI/pytorch-lightning#8857). Here each Lightning batch is a group of
k = data.steps_per_call (x, y) batches (mlplab.batching.StepBatches) and `FastPathClassifier` takes one
optimiser step per batch of the group, in manual optimisation, as Keras's `steps_per_execution` does.
Which batches are drawn, in what order, and the weights after every step are those of the textbook path
(mlplab.module.Classifier; tests/test_train.py compares them bit for bit).

What differs from Lightning's documented behaviour on this path, and what the kit does instead
(README, "The fast path", holds the same table):

    trainer.gradient_clip_val,        clipped every optimiser step by the kit (same norm, same algorithm),
    trainer.gradient_clip_algorithm   before the update, after 16-mixed unscales
    trainer.accumulate_grad_batches   refused before training: raise data.batch_size, or data.steps_per_call=1
    trainer.overfit_batches           refused before training (it would count groups): data.steps_per_call=1
    trainer.limit_train_batches=N     kept for an int N: N optimiser steps an epoch (Lightning gets the groups
                                      that hold them; the kit stops inside the last); a fraction is refused
    trainer.val_check_interval        refused unless 1.0/null (it would count groups): data.steps_per_call=1
    ModelCheckpoint(every_n_train_steps)  refused before training (fires only on group boundaries)
    trainer.fast_dev_run=N            runs N groups: N x k optimiser steps
    trainer.log_every_n_steps         kept: train/loss_step every N optimiser steps, logged by the kit
    trainer.max_steps                 kept: the kit stops inside a group at exactly max_steps
    progress bar, profiler spans      per group, not per step
    x axis of epoch values            the kit logs "step" = global_step (Lightning would count groups)
    LR scheduler                      stepped by the kit at each epoch's end (manual optimisation)

The shortcut: where Lightning's manual_backward and optimizer wrapper have nothing to do (one device,
full precision, no profiler, no callback listening to their hooks), the step calls loss.backward() and
the torch optimizer's own step(), and counts the step in Lightning's private step counter itself. That
counter (`PRIVATE_STEP_COUNTER`) is the one private Lightning attribute the kit touches, here only;
`step_counter` fails with a message naming it if an upgrade moves it (tests/test_fast_path.py).
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities.model_helpers import is_overridden
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from mlplab.module import Classifier

# Lightning warns when an epoch has fewer batches than trainer.log_every_n_steps. Here each of its batches
# holds data.steps_per_call optimiser steps and the kit counts log_every_n_steps in steps, so an epoch of a
# few groups still logs train/loss_step every log_every_n_steps steps: the warning does not apply to a fit
# of FastPathClassifier, and is silenced for that fit alone (setup/teardown); the textbook path keeps it.
FEW_BATCHES_WARNING = r"The number of training batches \(\d+\) is smaller than the logging interval"

# The count behind trainer.global_step in manual optimisation: Lightning's optimizer wrapper keeps it
# (Lightning-AI/pytorch-lightning#11848); the plain step keeps it here.
PRIVATE_STEP_COUNTER = "fit_loop.epoch_loop.manual_optimization.optim_step_progress"

# Trainer keys that count Lightning batches, which are groups here: (the value that leaves them inert, the fix)
REFUSED_TRAINER_KEYS: dict[str, tuple[tuple[Any, ...], str]] = {
    "accumulate_grad_batches": ((1,), "raise data.batch_size instead (k batches of B average like one of k x B), "
                                      "or set data.steps_per_call=1"),
    "overfit_batches": ((0, 0.0), "set data.steps_per_call=1 to overfit single batches"),
    "limit_train_batches": ((None, 1.0), "give a number of batches (an int), or set data.steps_per_call=1"),
    "val_check_interval": ((None, 1.0), "set data.steps_per_call=1 to validate within an epoch"),
}


def train_step_limit(cfg: DictConfig) -> int | None:
    """trainer.limit_train_batches when it is a number of batches (an int), else None."""
    limit = cfg.trainer.limit_train_batches
    return limit if isinstance(limit, int) and not isinstance(limit, bool) else None


def fast_path_refusals(cfg: DictConfig) -> list[str]:
    """What in `cfg` cannot work with data.steps_per_call > 1: one message per key, each naming the fix."""
    refusals = []
    for key, (inert, fix) in REFUSED_TRAINER_KEYS.items():
        value = OmegaConf.select(cfg, f"trainer.{key}", default=None)
        if key == "limit_train_batches" and train_step_limit(cfg) is not None:
            continue  # a number of steps: see FastPathClassifier's limit_train_batches
        if value not in inert:
            refusals.append(f"trainer.{key}={value} counts Lightning batches, which hold "
                            f"data.steps_per_call={cfg.data.steps_per_call} steps each here: {fix}")
    for name, callback in (cfg.callbacks or {}).items():
        if callback is not None and OmegaConf.select(callback, "every_n_train_steps", default=None):
            refusals.append(f"callbacks.{name}.every_n_train_steps fires only where a group of "
                            f"data.steps_per_call={cfg.data.steps_per_call} steps ends: use every_n_epochs, "
                            "or set data.steps_per_call=1")
    return refusals


def step_counter(trainer: L.Trainer) -> Any:
    """Lightning's private progress object behind trainer.global_step in manual optimisation."""
    try:
        return operator.attrgetter(PRIVATE_STEP_COUNTER)(trainer)
    except AttributeError as err:
        raise RuntimeError(
            f"this Lightning ({L.__version__}) has no trainer.{PRIVATE_STEP_COUNTER}, which the fast path counts "
            "its optimiser steps in: run with data.steps_per_call=1, or install the Lightning version in "
            "pyproject.toml") from err


def one_device_full_precision(trainer: L.Trainer) -> bool:
    """Whether Lightning's strategy and precision plugin leave backward and optimizer.step as they are:
    on one device in full precision they do nothing (DDP arms the gradient all-reduce, 16-mixed scales)."""
    return type(trainer.strategy) is SingleDeviceStrategy and type(trainer.precision_plugin) is Precision


def hooks_listened(trainer: L.Trainer, hooks: tuple[str, ...]) -> bool:
    """Whether a callback, or a subclass of FastPathClassifier, overrides any of `hooks`."""
    return (any(is_overridden(hook, callback, L.Callback) for callback in trainer.callbacks for hook in hooks)
            or any(is_overridden(hook, trainer.lightning_module, FastPathClassifier) for hook in hooks))


def plain_backward_suffices(trainer: L.Trainer) -> bool:
    """Whether `loss.backward()` does all that `LightningModule.manual_backward(loss)` would do here.

    manual_backward is the strategy's pre-backward work (DDP: arm the gradient all-reduce), the
    precision plugin's (16-mixed: scale the loss), on_before_backward / on_after_backward dispatched
    to every callback and the module, and loss.backward(). On one device in full precision, with
    neither hook overridden, only loss.backward() has an effect; the dispatch alone is a visible
    share of a small step (README, Performance).
    """
    return one_device_full_precision(trainer) and not hooks_listened(
        trainer, ("on_before_backward", "on_after_backward", "backward"))


def plain_step_suffices(trainer: L.Trainer) -> bool:
    """Whether the torch optimizer's own step() does all that Lightning's optimizer wrapper would do here,
    apart from counting the step (which FastPathClassifier.training_step then does itself).

    LightningOptimizer.step() is the profiler's "optimizer_step" span, the precision plugin's step
    (16-mixed: unscale, skip on inf), a closure that dispatches on_before_optimizer_step to every
    callback and the module, and the step count behind trainer.global_step. On one device in full
    precision, with no profiler and nothing else listening to the hook, only the count is left.
    """
    return (one_device_full_precision(trainer) and isinstance(trainer.profiler, PassThroughProfiler)
            and not hooks_listened(trainer, ("on_before_optimizer_step",)))


def first_non_finite(losses: list[Tensor]) -> int | None:
    """The index of the first NaN/inf among scalar losses, or None. Reads them all at once (one device wait)."""
    finite = torch.isfinite(torch.stack(losses))
    return None if bool(finite.all()) else int(finite.logical_not().nonzero()[0])


class FastPathClassifier(Classifier):
    """Classifier that takes one optimiser step per (x, y) batch of each StepBatches group (see the module docs).

    Args:
        *args, **kwargs: as Classifier.
        gradient_clip_val: if set, each step's gradient norm (or values, by gradient_clip_algorithm) is
            clipped to it before the update: the Trainer's own keys, which Lightning refuses in manual
            optimisation, handed over by mlplab.config.build_trainer.
        gradient_clip_algorithm: "norm" (the Trainer's default for None) or "value".
        limit_train_batches: if set, optimiser steps per epoch (the Trainer's key, handed over with the
            Trainer's own limit set to the groups that hold them).
    """

    def __init__(self, *args: Any, gradient_clip_val: float | None = None,
                 gradient_clip_algorithm: str | None = None, limit_train_batches: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False  # training_step takes several steps per call
        self.gradient_clip_val = gradient_clip_val
        self.gradient_clip_algorithm = gradient_clip_algorithm or "norm"
        self.limit_train_batches = limit_train_batches
        self.plain_backward = self.plain_step = False  # set when fitting starts
        self.epoch_steps = 0  # optimiser steps taken in the current epoch
        self.fit_warnings: warnings.catch_warnings | None = None  # the filters as they were before this fit

    def training_step(self, batches: Iterable[tuple[Tensor, Tensor]], batch_idx: int) -> None:
        # One optimiser step per (x (B, D), y (B,)) batch of the group. Through manual_backward and Lightning's
        # optimizer wrapper where they have work to do, else through loss.backward() and the torch optimizer's
        # own step() (see plain_backward_suffices, plain_step_suffices).
        optimizer = self.optimizers()
        every = self.trainer.log_every_n_steps
        losses, logits_seen, targets = [], [], []
        first = step = self.global_step  # steps done before this call
        # trainer.max_steps counts optimiser steps; Lightning checks it between its batches only
        max_steps = self.trainer.max_steps if self.trainer.max_steps >= 0 else math.inf
        epoch_limit = self.limit_train_batches if self.limit_train_batches is not None else math.inf
        progress = step_counter(self.trainer)
        for x, y in batches:
            if step >= max_steps or self.epoch_steps >= epoch_limit:
                break
            logits = self.model(x)
            loss = self.loss(logits, y)
            optimizer.zero_grad()
            if self.plain_backward:
                loss.backward()
            else:
                self.manual_backward(loss)
            if self.plain_step:
                self.on_before_optimizer_step(optimizer)  # what the wrapper would call here: the clipping
                optimizer.optimizer.step()
                progress.increment_ready()
                progress.increment_completed()
            else:
                optimizer.step()  # clips first if asked: see on_before_optimizer_step
            step += 1
            self.epoch_steps += 1
            losses.append(loss.detach())
            logits_seen.append(logits.detach())
            targets.append(y)
            # the step loss every trainer.log_every_n_steps optimiser steps, at x = global_step (steps done);
            # straight to the loggers because Lightning's own interval counts its batches, not steps
            if every and step % every == 0:
                value = loss.item()
                if not math.isfinite(value):  # the first bad step of this call, not necessarily this one
                    bad = first_non_finite(losses)
                    raise self.divergence(losses[bad].item(), first + bad)
                for logger in self.loggers:
                    logger.log_metrics({"train/loss_step": value}, step=step)
        if not losses:  # a limit was reached before this call (Lightning normally stops first)
            return
        # Every step's loss checked once per call on the CPU, where reading a value costs no device wait; on a
        # GPU only at the logging interval (above). A diverged step ends the run before anything is written:
        # checkpoints come at the epoch's end.
        if self.device.type == "cpu" and (bad := first_non_finite(losses)) is not None:
            raise self.divergence(losses[bad].item(), first + bad)
        # Epoch values: the metric objects accumulate on the device, once per call
        self.train_loss.update(torch.cat([loss.expand(len(y)) for loss, y in zip(losses, targets)]))  # per sample
        self.train_acc.update(torch.cat(logits_seen), torch.cat(targets))
        # Each self.log call costs Python time (README, Performance): each name is logged once per call at most.
        # An epoch value is the metric object's own accumulation, computed when the epoch ends: one call per
        # epoch registers it.
        if batch_idx == 0:
            self.log("train/loss", self.train_loss, on_step=False, on_epoch=True)
            self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        if self.trainer.progress_bar_callback is not None:
            self.log("train/loss_step", losses[-1], prog_bar=True, logger=False)  # the call's last step

    def on_before_optimizer_step(self, optimizer) -> None:
        # Here, not between backward and step in training_step: 16-mixed unscales the gradients inside
        # optimizer.step(), just before this hook, and clipping scaled gradients would clip the wrong norm.
        # Lightning's optimizer wrapper calls it; the plain step (full precision) calls it itself.
        if self.gradient_clip_val is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val,
                                gradient_clip_algorithm=self.gradient_clip_algorithm)

    def setup(self, stage: str) -> None:
        if stage == "fit":  # before the fit loop's check (see FEW_BATCHES_WARNING); restored in teardown
            self.fit_warnings = warnings.catch_warnings()
            self.fit_warnings.__enter__()
            warnings.filterwarnings("ignore", message=FEW_BATCHES_WARNING)

    def teardown(self, stage: str) -> None:
        if stage == "fit" and self.fit_warnings is not None:
            self.fit_warnings.__exit__(None, None, None)
            self.fit_warnings = None

    def on_fit_start(self) -> None:
        step_counter(self.trainer)  # fails here, naming the attribute, if Lightning moved it
        if self.trainer.fast_dev_run:
            # Lightning's fast_dev_run=N sets max_steps=N as well as limit_*_batches=N and max_epochs=1. Its
            # max_steps counts optimiser steps, which would stop the run inside the first group, before any
            # val pass; the limits alone end it after N groups, the last one validated as usual.
            self.trainer.fit_loop.epoch_loop.max_steps = -1  # where Lightning set it (_init_debugging_flags)
        self.plain_backward = plain_backward_suffices(self.trainer)
        self.plain_step = plain_step_suffices(self.trainer)

    def on_train_epoch_start(self) -> None:
        self.epoch_steps = 0

    def on_train_epoch_end(self) -> None:
        # Manual optimisation leaves the schedule to the module: one step per epoch. It runs before
        # ModelCheckpoint saves last.ckpt, so a resumed run starts the next epoch at the next rate.
        if (scheduler := self.lr_schedulers()) is not None:
            scheduler.step()
        self.log_step()

    def on_validation_epoch_end(self) -> None:
        self.log_step()

    def log_step(self) -> None:
        """Logs "step" = global_step with a stage's epoch values, which Lightning then uses as their x in
        TensorBoard (its default, the count of its batches, is not the step count when a batch holds
        data.steps_per_call optimiser steps): train/loss_step and the epoch values share one axis."""
        self.log("step", float(self.global_step), on_step=False, on_epoch=True, batch_size=1, sync_dist=True)  # equal on all ranks
