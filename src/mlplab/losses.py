"""Every loss choice, behind one interface: loss(logits (B, K), targets (B,) int) -> scalar.

cross_entropy is torch's own `nn.CrossEntropyLoss` (configured directly in conf/loss/).
The others turn the integer targets into one-hot rows first:
- mse, l1, huber compare softmax probabilities with the one-hot row (the regression view);
- bce scores each class as its own sigmoid yes/no (one-vs-rest);
- scratch_cross_entropy is the log-softmax cross-entropy of mlplab.scratch, no torch loss call.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from mlplab import scratch


class ProbabilityLoss(nn.Module):
    """A regression loss between softmax(logits) and one-hot targets.

    Args:
        kind: "mse", "l1" or "huber".
        delta: where huber switches from quadratic to linear (ignored by mse and l1).
    """

    def __init__(self, kind: str = "mse", delta: float = 1.0) -> None:
        super().__init__()
        if kind not in ("mse", "l1", "huber"):
            raise ValueError(f"kind={kind!r} is not one of ['mse', 'l1', 'huber']")
        if not isinstance(delta, (int, float)) or delta <= 0:
            raise ValueError(f"delta={delta!r} must be a positive number")
        self.kind, self.delta = kind, delta

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        probs = logits.softmax(dim=-1)  # (B, K)
        one_hot = F.one_hot(targets, logits.shape[-1]).to(probs.dtype)  # (B, K)
        if self.kind == "mse":
            return F.mse_loss(probs, one_hot)
        if self.kind == "l1":
            return F.l1_loss(probs, one_hot)
        return F.huber_loss(probs, one_hot, delta=self.delta)


class OneVsRestBCE(nn.Module):
    """Binary cross-entropy of each class's sigmoid(logit) against 'is this the class'."""

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        one_hot = F.one_hot(targets, logits.shape[-1]).to(logits.dtype)  # (B, K)
        return F.binary_cross_entropy_with_logits(logits, one_hot)


class ScratchCrossEntropy(nn.Module):
    """Cross-entropy from the formula (max-subtracted log-softmax); matches nn.CrossEntropyLoss."""

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return scratch.cross_entropy(logits, targets)
