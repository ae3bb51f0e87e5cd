"""Entropy, cross-entropy and KL divergence of discrete distributions.

All functions take probabilities along the last dimension (batched over any leading ones)
and return one value per distribution, in bits (base=2) or nats (base=e). Terms with
p = 0 contribute 0 (the limit of p log p), so one-hot and sparse distributions are safe.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _log(x: Tensor, base: float) -> Tensor:
    return torch.log(x) / math.log(base)


def entropy(p: Tensor, base: float = 2.0) -> Tensor:
    """H(p) = -sum_i p_i log p_i.  (..., K) -> (...)"""
    return -(p * _log_where_p(p, p, base)).sum(-1)


def _log_where_p(p: Tensor, x: Tensor, base: float) -> Tensor:
    """log x where p > 0, else 0; the masked entries never reach log (so no 0 * inf gradient)."""
    return _log(torch.where(p > 0, x, torch.ones_like(x)), base)


def cross_entropy(p: Tensor, q: Tensor, base: float = 2.0) -> Tensor:
    """H(p, q) = -sum_i p_i log q_i; infinite where q_i = 0 < p_i.  (..., K), (..., K) -> (...)"""
    return -(p * _log_where_p(p, q, base)).sum(-1)


def kl_divergence(p: Tensor, q: Tensor, base: float = 2.0) -> Tensor:
    """KL(p || q) = sum_i p_i log(p_i / q_i) = H(p, q) - H(p) >= 0.  (..., K), (..., K) -> (...)"""
    return (p * (_log_where_p(p, p, base) - _log_where_p(p, q, base))).sum(-1)


def entropy_from_logits(logits: Tensor, base: float = 2.0) -> Tensor:
    """Predictive entropy of softmax(logits), computed from log-probabilities (no 0 * -inf).

    (..., K) logits -> (...) entropy; 0 for a certain prediction, log_base(K) for a uniform one.
    """
    if logits.dtype not in (torch.float32, torch.float64):  # half precisions: sum in float32
        logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    return -torch.where(p > 0, p * logp, 0.0).sum(-1) / math.log(base)  # a -inf logit: 0 log 0 = 0
