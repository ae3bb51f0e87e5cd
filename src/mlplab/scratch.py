"""The classic functions written out from their formulas, with no torch loss call.

They exist to be read next to the maths and checked against torch (tests/test_scratch.py);
`scratch_cross_entropy` is also a selectable training loss (`loss=scratch_cross_entropy`).
Shapes: logits (B, K), integer targets (B,), one-hot or probability targets (B, K).
"""

from __future__ import annotations

import torch
from torch import Tensor


def softmax(logits: Tensor) -> Tensor:
    """exp(z_i - max z) / sum_j exp(z_j - max z): the max subtraction keeps exp() <= 1,
    so logits of 1000 don't overflow.  (B, K) -> (B, K)"""
    z = logits - logits.amax(dim=-1, keepdim=True)
    e = z.exp()
    return e / e.sum(dim=-1, keepdim=True)


def log_softmax(logits: Tensor) -> Tensor:
    """z_i - max z - log sum_j exp(z_j - max z), exact in log space.  (B, K) -> (B, K)"""
    z = logits - logits.amax(dim=-1, keepdim=True)
    return z - z.exp().sum(dim=-1, keepdim=True).log()


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over the batch of -log softmax(logits)[target].  (B, K), (B,) -> ()"""
    return -log_softmax(logits).gather(1, targets.long().unsqueeze(1)).mean()


def binary_cross_entropy_with_logits(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean of -[t log sigmoid(z) + (1 - t) log(1 - sigmoid(z))], written in the stable form
    max(z, 0) - z t + log(1 + exp(-|z|)), which never takes the log of 0.  (B, K), (B, K) -> ()"""
    return (logits.clamp_min(0) - logits * targets + (-logits.abs()).exp().log1p()).mean()


def mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean of (pred - target)^2 over all elements."""
    return ((pred - target) ** 2).mean()


def l1(pred: Tensor, target: Tensor) -> Tensor:
    """Mean of |pred - target| over all elements."""
    return (pred - target).abs().mean()


def huber(pred: Tensor, target: Tensor, delta: float = 1.0) -> Tensor:
    """Mean of 0.5 r^2 where |r| <= delta, else delta (|r| - 0.5 delta); r = pred - target."""
    r = (pred - target).abs()
    return torch.where(r <= delta, 0.5 * r**2, delta * (r - 0.5 * delta)).mean()
