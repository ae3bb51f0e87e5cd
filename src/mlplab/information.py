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
    return -torch.where(p > 0, p * _log(p.clamp_min(torch.finfo(p.dtype).tiny), base), 0.0).sum(-1)


def cross_entropy(p: Tensor, q: Tensor, base: float = 2.0) -> Tensor:
    """H(p, q) = -sum_i p_i log q_i; infinite where q_i = 0 < p_i.  (..., K), (..., K) -> (...)"""
    return -torch.where(p > 0, p * _log(q, base), 0.0).sum(-1)


def kl_divergence(p: Tensor, q: Tensor, base: float = 2.0) -> Tensor:
    """KL(p || q) = sum_i p_i log(p_i / q_i) = H(p, q) - H(p) >= 0.  (..., K), (..., K) -> (...)"""
    return torch.where(p > 0, p * (_log(p.clamp_min(torch.finfo(p.dtype).tiny), base) - _log(q, base)), 0.0).sum(-1)


def entropy_from_logits(logits: Tensor, base: float = 2.0) -> Tensor:
    """Predictive entropy of softmax(logits), computed from log-probabilities (no 0 * -inf).

    (..., K) logits -> (...) entropy; 0 for a certain prediction, log_base(K) for a uniform one.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1) / math.log(base)
