"""The LightningModule: a plain model + a loss + metrics + the optimiser choice, under automatic optimisation.

This is the textbook path (data.steps_per_call=1): one (x, y) batch per training_step, and every
Trainer feature as Lightning documents it. The default fast path (data.steps_per_call > 1) is a
subclass in mlplab.fast_path.
"""

from __future__ import annotations

from functools import partial

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from mlplab.information import entropy_from_logits


# What Classifier logs once an epoch, whatever the path: the values `monitor` may pick
EPOCH_METRICS = ("val/acc", "val/loss", "val/entropy_bits", "train/acc", "train/loss")


class DivergenceError(RuntimeError):
    """The training loss became NaN or infinite."""


class Classifier(L.LightningModule):
    """Trains `model` with `loss` and logs stage/name metrics.

    Logged: train/loss_step (every trainer.log_every_n_steps optimiser steps), train/loss, train/acc, val/loss,
    val/acc, val/entropy_bits (mean predictive entropy of softmax outputs, in bits), test/loss, test/acc, and
    test/acc_class_<class name> per class, the test's at the step of the weights tested (tested_step). Every
    epoch metric is a torchmetrics object: it accumulates on the device and is reduced over DDP ranks when
    computed, so no step forces a host sync.

    Args:
        model: maps (B, D) inputs to (B, K) logits.
        loss: loss(logits, targets) -> scalar.
        optimizer: a partial optimiser, completed here with the model's parameters.
        num_classes: K.
        scheduler: an optional partial LR scheduler, completed with the optimiser; stepped once per epoch.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: nn.Module,
        optimizer: partial,
        num_classes: int,
        scheduler: partial | None = None,
    ) -> None:
        super().__init__()
        self.model, self.loss = model, loss
        self.optimizer, self.scheduler = optimizer, scheduler
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

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch  # (B, D), (B,)
        logits = self.model(x)
        loss = self.loss(logits, y)
        self.check_finite(loss)
        self.train_loss.update(loss.detach().expand(len(y)))  # one value per sample
        self.train_acc.update(logits.detach(), y)
        self.log("train/loss_step", loss, prog_bar=True)
        self.log("train/loss", self.train_loss, on_step=False, on_epoch=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def check_finite(self, loss: Tensor) -> None:
        """Raises DivergenceError if this step's loss is NaN or infinite.

        Reading the loss waits for the device: on the CPU that is free and happens every step; on a
        GPU only every trainer.log_every_n_steps steps, so the first bad step may lie earlier in that interval.
        """
        every = self.trainer.log_every_n_steps or 1
        if self.device.type == "cpu" or (self.global_step + 1) % every == 0:
            if not torch.isfinite(loss):
                raise self.divergence(loss.item(), self.global_step)

    def divergence(self, loss: float, step: int) -> DivergenceError:
        """The error for a non-finite training loss at optimiser step `step` (0-based, counted from the run's start)."""
        lr = self.optimizers().param_groups[0]["lr"]
        return DivergenceError(
            f"training loss is {loss} at epoch {self.current_epoch}, step {step} (learning rate {lr:g}). Lower "
            "optimizer.lr or pick a loss/init/schedule that keeps the logits finite; the checkpoints written "
            "before this step are kept.")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self.model(x)
        self.val_loss.update(self.loss(logits, y).expand(len(y)))
        self.val_acc.update(logits, y)
        self.val_entropy.update(entropy_from_logits(logits, base=2))
        self.log("val/loss", self.val_loss, prog_bar=True)
        self.log("val/acc", self.val_acc, prog_bar=True)
        self.log("val/entropy_bits", self.val_entropy)

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
        for name, acc in zip(self.trainer.datamodule.classes, self.test_class_acc.compute()):
            self.log(f"test/acc_class_{name}", acc, sync_dist=True)  # equal on all ranks already; quiets Lightning
        self.test_class_acc.reset()
        # "step" is the x Lightning gives the stage's values in TensorBoard: the tested checkpoint's, not the last
        self.log("step", float(self.tested_step()), on_step=False, on_epoch=True, batch_size=1, sync_dist=True)

    def tested_step(self) -> int:
        """The optimiser step of the weights under test: the loaded checkpoint's in trainer.test(ckpt_path=...)
        (best.ckpt, not the run's last step), else the current one."""
        return self.checkpoint_step if self.trainer.ckpt_path else self.global_step

    def configure_optimizers(self):
        optimizer = self.optimizer(self.parameters())
        if self.scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler(optimizer)}  # Lightning's default: once an epoch

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Global RNG state (dropout masks), so a resumed run continues the same random stream.
        checkpoint["rng_state"] = torch.get_rng_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.checkpoint_step = checkpoint["global_step"]  # see tested_step
        if "rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["rng_state"])
