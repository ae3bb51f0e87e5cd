"""Pictures of a trained classifier, for TensorBoard (at test time) and as PNGs (scripts/render_figures.py).

- misclassified: a grid of wrongly classified test images, titled "predicted / true";
- confusion: the confusion matrix, rows = true class, columns = predicted, counts in the cells;
- entropy: histograms of predictive entropy (bits) for correct vs wrong predictions;
- per-layer weight and gradient histograms, logged every few epochs during training.
"""

from __future__ import annotations

import math
from functools import cache
from types import ModuleType
from typing import TYPE_CHECKING

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

from mlplab.information import entropy_from_logits

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@cache  # the backend is chosen once
def pyplot() -> ModuleType:
    """matplotlib.pyplot on the Agg backend (files and TensorBoard only; never a window).

    Imported when the first figure is drawn, at the end of a run: at the top of this module, which
    Hydra imports to build TestFigures, it delayed every run's first training step.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def misclassified_grid(images: Tensor, preds: Tensor, targets: Tensor, classes: tuple[str, ...],
                       max_images: int = 36) -> Figure:
    """Args: images (N, H, W) of any scale (each shown min-max scaled); preds, targets (N,) ints.

    The tiles are pasted into one image in one axes, with the titles drawn over it: 36 subplots took
    several times as long to build and render to TensorBoard.
    """
    wrong = (preds != targets).nonzero().flatten()[:max_images].cpu()
    cols = max(1, min(6, len(wrong)))
    rows = max(1, math.ceil(len(wrong) / cols))
    h, w = images.shape[-2:]
    gap_y, gap_x = h // 3, w // 7  # room above each tile for its title, and between tiles
    mosaic = torch.ones(rows * (h + gap_y), cols * (w + gap_x))  # white where there is no tile
    fig, ax = pyplot().subplots(figsize=(1.6 * cols, 1.8 * rows))
    for k, i in enumerate(wrong.tolist()):
        tile = images[i].float().cpu()  # (H, W)
        tile = (tile - tile.min()) / (tile.max() - tile.min()).clamp_min(1e-12)  # to [0, 1], as imshow scales
        top, left = (k // cols) * (h + gap_y) + gap_y, (k % cols) * (w + gap_x) + gap_x // 2
        mosaic[top:top + h, left:left + w] = tile
        ax.text(left + w / 2, top - 1, f"{classes[preds[i]]} / {classes[targets[i]]}", ha="center", va="bottom",
                fontsize=7, color="tab:red")
    ax.imshow(mosaic.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.axis("off")
    fig.suptitle(f"misclassified (predicted / true): {len(wrong)} shown of {int((preds != targets).sum())}",
                 fontsize=9)
    fig.tight_layout()
    return fig


def confusion_figure(confusion: Tensor, classes: tuple[str, ...]) -> Figure:
    """Args: confusion (K, K) counts, rows = true class, columns = predicted class."""
    counts = confusion.cpu().numpy()
    k = len(classes)
    fig, ax = pyplot().subplots(figsize=(0.55 * k + 2.5, 0.55 * k + 2))
    ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(k), classes, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(k), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = counts.max() / 2
    for t in range(k):
        for p in range(k):
            ax.text(p, t, int(counts[t, p]), ha="center", va="center", fontsize=6,
                    color="white" if counts[t, p] > threshold else "black")
    ax.set_title(f"confusion matrix, accuracy {counts.trace() / max(counts.sum(), 1):.2%}", fontsize=9)
    fig.tight_layout()
    return fig


def entropy_histogram(entropy_bits: Tensor, correct: Tensor, num_classes: int) -> Figure:
    """Args: entropy_bits (N,) predictive entropy; correct (N,) bool."""
    e, c = entropy_bits.float().cpu().numpy(), correct.cpu().numpy()
    fig, ax = pyplot().subplots(figsize=(5, 3.2))
    bins = torch.linspace(0, math.log2(num_classes), 41).numpy()
    ax.hist(e[c], bins=bins, alpha=0.6, density=True, label=f"correct ({c.sum()}), mean {e[c].mean():.3f} bits")
    if (~c).any():
        ax.hist(e[~c], bins=bins, alpha=0.6, density=True,
                label=f"wrong ({(~c).sum()}), mean {e[~c].mean():.3f} bits")
    ax.set_xlabel("predictive entropy (bits)")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    ax.set_title("how unsure the model is, when right and when wrong", fontsize=9)
    fig.tight_layout()
    return fig


def test_figures(images: Tensor, logits: Tensor, targets: Tensor, classes: tuple[str, ...]) -> dict[str, Figure]:
    """All three test-set figures from one forward pass.

    Args:
        images: (N, H, W) inputs as images; logits: (N, K); targets: (N,) ints.
    """
    preds = logits.argmax(-1)
    confusion = torch.zeros(len(classes), len(classes), dtype=torch.long)
    confusion.index_put_((targets.cpu(), preds.cpu()), torch.ones_like(targets.cpu()), accumulate=True)
    return {
        "misclassified": misclassified_grid(images, preds, targets, classes),
        "confusion": confusion_figure(confusion, classes),
        "entropy": entropy_histogram(entropy_from_logits(logits, base=2), preds == targets, len(classes)),
    }


class TestFigures(L.Callback):
    """Logs the test figures to TensorBoard (tags figures/test_<name>) at the end of testing, at the step of the
    weights tested (Classifier.tested_step), as the test scalars.

    Under DDP each rank holds its own shard of the test set; the figures show rank 0's shard.

    Args:
        image_shape: (H, W) to reshape the flat (B, H*W) inputs into for display.
    """

    def __init__(self, image_shape: tuple[int, int] = (28, 28)) -> None:
        self.image_shape = tuple(image_shape)
        self.inputs: list[Tensor] = []
        self.logits: list[Tensor] = []
        self.targets: list[Tensor] = []

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.inputs, self.logits, self.targets = [], [], []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        x, y = batch
        self.inputs.append(x.detach().cpu())
        self.logits.append(outputs["logits"].cpu())
        self.targets.append(y.cpu())

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or not isinstance(trainer.logger, TensorBoardLogger) or not self.targets:
            return
        images = torch.cat(self.inputs).reshape(-1, *self.image_shape)
        classes = trainer.datamodule.classes
        for name, fig in test_figures(images, torch.cat(self.logits), torch.cat(self.targets), classes).items():
            trainer.logger.experiment.add_figure(f"figures/test_{name}", fig, global_step=pl_module.tested_step())
        self.inputs, self.logits, self.targets = [], [], []


def add_histogram(writer: SummaryWriter, tag: str, values: Tensor, step: int, bins: int = 64) -> None:
    """`writer.add_histogram(tag, values, step)` with the counting done by torch, in `bins` equal bins.

    SummaryWriter counts with numpy, whose sum of squares is a multi-threaded BLAS `dot` that
    waits for cores torch's own threads are spinning on: several times slower on a small CPU.
    The event is the one add_histogram writes: the right bin edges, with an empty bin first whose
    edge is the minimum.
    """
    v = values.detach().flatten().double().cpu()  # (N,)
    vmin, vmax = (t.item() for t in torch.aminmax(v))  # one pass, far cheaper than min() then max()
    lo, hi = (vmin - 0.5, vmax + 0.5) if vmin == vmax else (vmin, vmax)  # numpy's range for a constant tensor
    counts = torch.histc(v, bins=bins, min=lo, max=hi)  # (bins,)
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)  # (bins + 1,)
    writer.add_histogram_raw(tag, min=vmin, max=vmax, num=len(v), sum=v.sum().item(), sum_squares=v.dot(v).item(),
                             bucket_limits=edges.tolist(), bucket_counts=[0.0, *counts.tolist()], global_step=step)


class ParameterHistograms(L.Callback):
    """Logs per-layer weight and gradient histograms (weights/<param>, grads/<param>) after the last
    training batch of every n-th epoch: the weights after its last step, the gradients of that step
    (the module zeroes them when the next step begins; Lightning frees them when validation starts).
    A run that starts from scratch also logs its initial weights, at step 0.

    Args:
        every_n_epochs: log in every n-th training epoch.
    """

    def __init__(self, every_n_epochs: int = 1) -> None:
        self.every_n_epochs = every_n_epochs

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (trainer.global_step == 0 and trainer.is_global_zero  # not on a resume
                and isinstance(trainer.logger, TensorBoardLogger)):
            for name, param in pl_module.named_parameters():
                add_histogram(trainer.logger.experiment, f"weights/{name}", param, 0)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if (batch_idx + 1 != trainer.num_training_batches or not trainer.is_global_zero
                or not isinstance(trainer.logger, TensorBoardLogger) or trainer.current_epoch % self.every_n_epochs):
            return
        writer = trainer.logger.experiment
        for name, param in pl_module.named_parameters():
            add_histogram(writer, f"weights/{name}", param, trainer.global_step)
            if param.grad is not None:
                add_histogram(writer, f"grads/{name}", param.grad, trainer.global_step)
