"""Rebuild a trained model from its checkpoint alone and evaluate it on the test set.

A checkpoint holds plain tensors and containers only (it loads with weights_only=True): the
weights, the optimiser state, and the run's resolved config under "config", from which the
data and model are rebuilt here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from mlplab.data import ImageClassificationData
from mlplab.config import build_model
from mlplab.resume import read_checkpoint


def load_checkpoint(path: str | Path, data_root: str | None = None
                    ) -> tuple[DictConfig, nn.Module, ImageClassificationData]:
    """Returns (config, model in eval mode on the CPU, datamodule set up on the CPU).

    Args:
        path: a .ckpt written by a run.
        data_root: read the data from here instead of the root the run used.
    """
    checkpoint = read_checkpoint(path, key=None)  # a clear ResumeError (ValueError) for a text file, a folder...
    cfg = OmegaConf.create(checkpoint["config"])
    if data_root is not None:
        cfg.data.root = data_root
    datamodule = instantiate(cfg.data)
    datamodule.setup("test")
    model = build_model(cfg, datamodule)
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state)
    return cfg, model.eval(), datamodule


@torch.no_grad()
def predict(model: nn.Module, datamodule: ImageClassificationData, split: str = "test") -> tuple[Tensor, Tensor, Tensor]:
    """(inputs (N, D), logits (N, K), targets (N,)) over a whole split, in its batches."""
    x, y = datamodule.splits[split]
    logits = torch.cat([model(x[i:i + datamodule.eval_batch_size]) for i in range(0, len(x), datamodule.eval_batch_size)])
    return x, logits, y


def evaluate(path: str | Path, data_root: str | None = None) -> dict[str, Any]:
    """Test accuracy and loss of a checkpoint, computed with plain torch over the test set."""
    cfg, model, datamodule = load_checkpoint(path, data_root)
    _, logits, targets = predict(model, datamodule)
    loss = instantiate(cfg.loss)
    return {"test/acc": (logits.argmax(-1) == targets).double().mean().item(),
            "test/loss": loss(logits, targets).item(), "n": len(targets)}
