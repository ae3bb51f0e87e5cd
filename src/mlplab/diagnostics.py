"""Per-layer diagnostics: how each hidden layer of the MLP is doing, measured once an epoch on a fixed probe batch.

For hidden layer i (1 is next to the input) of a model with `hidden_layers` (mlplab.models.MLP), logged
as diagnostics/layer_<i>/<name>, so that they reach TensorBoard, history.json and metrics.json:

    grad_norm           L2 norm of dL/dW for the layer's Linear weight W, L the loss on the probe batch
    dead_fraction       units whose activation output is <= 0 for every probe image (a dead ReLU unit)
    saturated_fraction  (image, unit) pairs where the activation's derivative f'(z) at the unit's input z
                        has |f'(z)| < saturation_threshold; f' comes from autograd, so this holds for any
                        elementwise activation (sigmoid and tanh far from 0, ReLU for z < 0, ...)
    act_mean, act_std   mean and standard deviation of the activation outputs over all (image, unit) pairs

The probe batch is the first `probe_size` images of the validation split (data.split_seed fixes which),
the same every epoch and on every DDP rank. It is measured in eval mode, after the epoch's validation:
dropout off, BatchNorm on its running statistics, so the probe changes neither the weights, nor the
running statistics, nor any random stream, and a run with diagnostics trains exactly as one without.
The gradient is computed with torch.autograd.grad, leaving the parameters' .grad alone, and is that of
the network as it is evaluated (with BatchNorm, on running rather than batch statistics).

Cost: one forward and backward over the probe batch, one more backward through each activation,
and five self.log calls per hidden layer, once an epoch (scripts/bench.py measures it against an epoch).
Off: `~callbacks.layer_diagnostics` on the command line (or leave it out of the callbacks config).
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor, nn

NAMES = ("grad_norm", "dead_fraction", "saturated_fraction", "act_mean", "act_std")


def tag(layer: int, name: str) -> str:
    """The logged name of statistic `name` of hidden layer `layer` (1-based)."""
    return f"diagnostics/layer_{layer}/{name}"


def layer_statistics(model: nn.Module, loss: nn.Module, x: Tensor, y: Tensor,
                     saturation_threshold: float) -> dict[str, Tensor]:
    """The statistics of every hidden layer on one batch, as 0-dim tensors keyed by their logged name.

    Runs `model` as it is (train or eval mode: the caller chooses).

    Args:
        model: has `hidden_layers`, a list of (Linear, elementwise activation) pairs, input side first.
        loss: loss(logits, targets) -> scalar, whose gradient is measured.
        x: (N, D) inputs.
        y: (N,) targets.
        saturation_threshold: |f'(z)| below it counts as saturated.
    """
    layers = model.hidden_layers
    if not layers:  # softmax regression: no hidden layer to describe
        return {}
    seen: dict[int, tuple[Tensor, Tensor]] = {}  # layer index -> (activation input z, output a), each (N, H)

    def keep(i: int):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            seen[i] = (inputs[0], output)
        return hook

    handles = [activation.register_forward_hook(keep(i)) for i, (_, activation) in enumerate(layers)]
    try:
        with torch.enable_grad():
            grads = torch.autograd.grad(loss(model(x), y), [linear.weight for linear, _ in layers])
    finally:
        for handle in handles:
            handle.remove()
    values: dict[str, Tensor] = {}
    for i, ((_, activation), grad) in enumerate(zip(layers, grads)):
        z, a = (t.detach() for t in seen[i])
        z = z.clone().requires_grad_(True)
        with torch.enable_grad():
            # d sum(f(z)) / dz_ij = f'(z_ij) for an elementwise f: one backward gives every pair's derivative
            (slope,) = torch.autograd.grad(activation(z).sum(), z)
        stats = (grad.norm(), (a <= 0).all(dim=0).float().mean(), (slope.abs() < saturation_threshold).float().mean(),
                 a.mean(), a.std())
        values.update({tag(i + 1, name): value for name, value in zip(NAMES, stats)})
    return values


class LayerDiagnostics(L.Callback):
    """Logs layer_statistics of the module's model on the probe batch at the end of every training epoch.

    See the module docstring for what is measured, on which images, and how to turn it off.

    Args:
        probe_size: images in the probe batch (all of the validation split if it has fewer).
        saturation_threshold: |f'(z)| below it counts as saturated. 0.01 is 4% of the sigmoid's largest
            slope (|z| > 4.6) and 1% of tanh's (|z| > 3.0); LeakyReLU's default negative slope, 0.01, is not
            below it.
    """

    def __init__(self, probe_size: int = 1000, saturation_threshold: float = 0.01) -> None:
        if isinstance(probe_size, bool) or not isinstance(probe_size, int) or probe_size < 1:
            raise ValueError(f"probe_size={probe_size!r} must be a positive integer")
        if isinstance(saturation_threshold, bool) or not isinstance(saturation_threshold, (int, float)) \
                or not saturation_threshold > 0:
            raise ValueError(f"saturation_threshold={saturation_threshold!r} must be a number > 0")
        self.probe_size, self.saturation_threshold = probe_size, saturation_threshold

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = pl_module.model
        x, y = trainer.datamodule.splits["val"]
        was_training = model.training
        model.eval()
        try:
            values = layer_statistics(model, pl_module.loss, x[: self.probe_size], y[: self.probe_size],
                                      self.saturation_threshold)
        finally:
            model.train(was_training)
        if not values:
            return
        # Equal on every rank (same probe, same weights, same running statistics): sync_dist only quiets
        # Lightning's advice to reduce epoch values under DDP.
        pl_module.log_dict(values, on_step=False, on_epoch=True, batch_size=1, sync_dist=True)
