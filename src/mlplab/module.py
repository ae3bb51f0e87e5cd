"""The LightningModule: a plain model + a loss + metrics + the optimiser choice."""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import partial

import lightning as L
import torch
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from mlplab.information import entropy_from_logits


class DivergenceError(RuntimeError):
    """The training loss became NaN or infinite."""


def one_device_full_precision(trainer: L.Trainer) -> bool:
    """Whether Lightning's strategy and precision plugin leave backward and optimizer.step as they are:
    on one device in full precision they do nothing (DDP arms the gradient all-reduce, 16-mixed scales)."""
    return type(trainer.strategy) is SingleDeviceStrategy and type(trainer.precision_plugin) is Precision


def hooks_listened(trainer: L.Trainer, hooks: tuple[str, ...]) -> bool:
    """Whether a callback, or the module beyond what Classifier itself does, overrides any of `hooks`."""
    return (any(is_overridden(hook, callback, L.Callback) for callback in trainer.callbacks for hook in hooks)
            or any(is_overridden(hook, trainer.lightning_module, Classifier) for hook in hooks))


def plain_backward_suffices(trainer: L.Trainer) -> bool:
    """Whether `loss.backward()` does all that `LightningModule.manual_backward(loss)` would do here.

    manual_backward is the strategy's pre-backward work (DDP: arm the gradient all-reduce), the
    precision plugin's (16-mixed: scale the loss), on_before_backward / on_after_backward dispatched
    to every callback and the module, and loss.backward(). The dispatch alone costs ~0.1 ms a step
    on a 2-core CPU, a tenth of a plain batch-64 step (scripts/bench.py). On one device in full
    precision, with neither hook overridden, the rest does nothing and the plain call computes the
    same gradients (tests/test_train.py compares the weights of both).
    """
    return one_device_full_precision(trainer) and not hooks_listened(
        trainer, ("on_before_backward", "on_after_backward", "backward"))


def plain_step_suffices(trainer: L.Trainer) -> bool:
    """Whether the torch optimizer's own step() does all that Lightning's optimizer wrapper would do here,
    apart from counting the step (which Classifier.training_step then does itself).

    LightningOptimizer.step() is the profiler's "optimizer_step" span, the precision plugin's step
    (16-mixed: unscale, skip on inf), a closure that dispatches on_before_optimizer_step to every
    callback and the module, and the step count behind trainer.global_step. On a 2-core CPU that
    cost ~60 us a step with one callback and ~0.17 ms with the kit's ten (0.2 ms is a fifth of a
    plain batch-64 step). On one device in full precision, with no profiler and nothing else
    listening to the hook, only the count is left (tests/test_train.py compares the weights and
    step counts of both paths).
    """
    return (one_device_full_precision(trainer) and isinstance(trainer.profiler, PassThroughProfiler)
            and not hooks_listened(trainer, ("on_before_optimizer_step",)))


class Classifier(L.LightningModule):
    """Trains `model` with `loss` and logs stage/name metrics.

    Logged: train/loss_step (every trainer.log_every_n_steps optimiser steps), train/loss, train/acc, val/loss,
    val/acc, val/entropy_bits (mean predictive entropy of softmax outputs, in bits), test/loss, test/acc, and
    test/acc_class_<i> per class, all against the optimiser step. Every epoch metric is a torchmetrics
    object: it accumulates on the device and is reduced over DDP ranks when computed, so no step forces a
    host sync.

    Each training batch is a group of (x, y) batches (data.StepBatches), one optimiser step each, so
    optimisation is manual: training_step steps the optimiser, on_train_epoch_end the LR scheduler.

    Args:
        model: maps (B, D) inputs to (B, K) logits.
        loss: loss(logits, targets) -> scalar.
        optimizer: a partial optimiser, completed here with the model's parameters.
        num_classes: K.
        scheduler: an optional partial LR scheduler, completed with the optimiser; stepped
            once per epoch.
        gradient_clip_val: if set, each step's gradient norm (all parameters together) is clipped
            to it before the update, as Lightning's Trainer(gradient_clip_val=...) would do in
            automatic optimisation.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: nn.Module,
        optimizer: partial,
        num_classes: int,
        scheduler: partial | None = None,
        gradient_clip_val: float | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False  # training_step takes several steps per call: see there
        self.plain_backward = self.plain_step = False  # set when fitting starts
        self.model, self.loss = model, loss
        self.optimizer, self.scheduler = optimizer, scheduler
        self.gradient_clip_val = gradient_clip_val
        acc = partial(MulticlassAccuracy, num_classes, average="micro", validate_args=False)
        self.train_acc, self.val_acc, self.test_acc = acc(), acc(), acc()
        # Means over samples, fed one value per sample. MeanMetric's default nan_strategy ("warn") reads each
        # update's NaN check on the host, a device sync per step on a GPU; "disable" skips it (a NaN reaches
        # the mean instead of being dropped) but then ignores `weight` (torchmetrics 1.9), hence no weights.
        mean = partial(MeanMetric, nan_strategy="disable")
        self.train_loss, self.val_loss, self.test_loss = mean(), mean(), mean()
        self.val_entropy = mean()
        self.test_class_acc = MulticlassAccuracy(num_classes, average=None, validate_args=False)
        self.test_confusion = MulticlassConfusionMatrix(num_classes, validate_args=False)

    def forward(self, x: Tensor) -> Tensor:
        # (B, D) -> (B, K) logits
        return self.model(x)

    def training_step(self, batches: Iterable[tuple[Tensor, Tensor]], batch_idx: int) -> None:
        # One optimiser step per (x (B, D), y (B,)) batch of the group (data.steps_per_call of them), in
        # manual optimisation. Through manual_backward and Lightning's optimizer wrapper where they have
        # work to do (DDP all-reduces the gradients in backward, 16-mixed scales the loss and unscales
        # before the step, callbacks may listen); else through loss.backward() and the torch optimizer's
        # own step(), which skip their per-step cost (see plain_backward_suffices, plain_step_suffices).
        optimizer = self.optimizers()
        every = self.trainer.log_every_n_steps
        losses, logits_seen, targets = [], [], []
        first = step = self.global_step  # steps done before this call
        # trainer.max_steps counts optimiser steps; Lightning checks it between its batches only
        max_steps = self.trainer.max_steps if self.trainer.max_steps >= 0 else math.inf
        # The count behind trainer.global_step: the wrapper keeps it (Lightning-AI/pytorch-lightning#11848), the
        # plain step keeps it here. Lightning has no cheaper public path for a small model's CPU steps: its
        # per-step overhead there was closed as won't-fix (Lightning-AI/pytorch-lightning#8857).
        progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        for x, y in batches:
            if step >= max_steps:
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
            losses.append(loss.detach())
            logits_seen.append(logits.detach())
            targets.append(y)
            # the step loss every trainer.log_every_n_steps optimiser steps, at x = global_step (steps done);
            # straight to the loggers because Lightning's own interval counts its batches, not steps
            if every and step % every == 0:
                value = loss.item()
                if not math.isfinite(value):
                    raise self.divergence(value, step - 1)
                for logger in self.loggers:
                    logger.log_metrics({"train/loss_step": value}, step=step)
        if not losses:  # max_steps was reached before this call (Lightning normally stops first)
            return
        # NaN/inf check of every step's loss, once per call: reading a value waits for the device, which on
        # the CPU costs nothing, and on a GPU only happens at the logging interval (above). A diverged step
        # ends the run before anything is written: checkpoints come at the epoch's end.
        if self.device.type == "cpu" and not (finite := torch.isfinite(torch.stack(losses))).all():
            bad = int(finite.logical_not().nonzero()[0])
            raise self.divergence(losses[bad].item(), first + bad)
        # Epoch values: the metric objects accumulate on the device, once per call
        self.train_loss.update(torch.cat([loss.expand(len(y)) for loss, y in zip(losses, targets)]))  # per sample
        self.train_acc.update(torch.cat(logits_seen), torch.cat(targets))
        # One self.log call costs ~0.35 ms of Python on a 2-core CPU: each name is logged once per call
        # at most. An epoch value is the metric object's own accumulation, computed when the epoch ends:
        # one call per epoch registers it.
        if batch_idx == 0:
            self.log("train/loss", self.train_loss, on_step=False, on_epoch=True)
            self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        if self.trainer.progress_bar_callback is not None:
            self.log("train/loss_step", losses[-1], prog_bar=True, logger=False)  # the call's last step

    def divergence(self, loss: float, step: int) -> DivergenceError:
        """The error for a non-finite training loss at optimiser step `step` (0-based, counted from the run's start)."""
        lr = self.optimizers().param_groups[0]["lr"]
        return DivergenceError(
            f"training loss is {loss} at epoch {self.current_epoch}, step {step} (learning rate {lr:g}). Lower "
            "optimizer.lr or pick a loss/init/schedule that keeps the logits finite; the checkpoints written "
            "before this step are kept.")

    def on_before_optimizer_step(self, optimizer) -> None:
        # Here, not between backward and step in training_step: 16-mixed unscales the gradients inside
        # optimizer.step(), just before this hook, and clipping scaled gradients would clip the wrong norm.
        # Lightning's optimizer wrapper calls it; the plain step (full precision) calls it itself.
        if self.gradient_clip_val is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")

    def on_fit_start(self) -> None:
        self.plain_backward = plain_backward_suffices(self.trainer)
        self.plain_step = plain_step_suffices(self.trainer)

    def on_train_epoch_end(self) -> None:
        # Manual optimisation leaves the schedule to the module: one step per epoch. It runs before
        # ModelCheckpoint saves last.ckpt, so a resumed run starts the next epoch at the next rate.
        if (scheduler := self.lr_schedulers()) is not None:
            scheduler.step()
        self.log_step()

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self.model(x)
        self.val_loss.update(self.loss(logits, y).expand(len(y)))
        self.val_acc.update(logits, y)
        self.val_entropy.update(entropy_from_logits(logits, base=2))
        self.log("val/loss", self.val_loss, prog_bar=True)
        self.log("val/acc", self.val_acc, prog_bar=True)
        self.log("val/entropy_bits", self.val_entropy)

    def on_validation_epoch_end(self) -> None:
        self.log_step()

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        x, y = batch
        logits = self.model(x)
        self.test_loss.update(self.loss(logits, y).expand(len(y)))
        self.test_acc.update(logits, y)
        self.test_class_acc.update(logits, y)
        self.test_confusion.update(logits, y)
        self.log("test/loss", self.test_loss)
        self.log("test/acc", self.test_acc)
        return {"logits": logits.detach()}  # read by the figure callback

    def on_test_epoch_end(self) -> None:
        for i, acc in enumerate(self.test_class_acc.compute()):
            self.log(f"test/acc_class_{i}", acc, sync_dist=True)  # equal on all ranks already; quiets Lightning
        self.test_class_acc.reset()
        self.log_step()

    def configure_optimizers(self):
        optimizer = self.optimizer(self.parameters())
        if self.scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler(optimizer)}  # stepped in on_train_epoch_end

    def log_step(self) -> None:
        """Logs "step" = global_step with a stage's epoch values, which Lightning then uses as their x in
        TensorBoard (its default, the count of its batches, is not the step count when a batch holds
        data.steps_per_call optimiser steps): train/loss_step and the epoch values share one axis."""
        self.log("step", float(self.global_step), on_step=False, on_epoch=True, batch_size=1, sync_dist=True)  # equal on all ranks

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Global RNG state (dropout masks), so a resumed run continues the same random stream.
        checkpoint["rng_state"] = torch.get_rng_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["rng_state"])
