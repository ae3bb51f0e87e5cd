"""mlplab.losses against closed forms written out here, and every conf/loss choice through Hydra."""

from __future__ import annotations

from pathlib import Path

import hydra.utils
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from mlplab.losses import OneVsRestBCE, ProbabilityLoss, ScratchCrossEntropy

CONF = Path(__file__).resolve().parents[1] / "conf"
B, K = 12, 10


def batch(seed: int, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(B, K, generator=g, dtype=torch.float64)
    targets = torch.randint(0, K, (B,), generator=g)
    return logits, targets


# Closed forms in NumPy, from (B, K) logits and (B,) int targets, averaged over all B*K entries
# (or over B for cross-entropy).
def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_one_hot(t: np.ndarray) -> np.ndarray:
    out = np.zeros((len(t), K))
    out[np.arange(len(t)), t] = 1.0
    return out


def closed_mse(z, t, delta=None):
    return float(np.mean((np_softmax(z) - np_one_hot(t)) ** 2))


def closed_l1(z, t, delta=None):
    return float(np.mean(np.abs(np_softmax(z) - np_one_hot(t))))


def closed_huber(z, t, delta=1.0):
    r = np.abs(np_softmax(z) - np_one_hot(t))
    return float(np.mean(np.where(r <= delta, 0.5 * r**2, delta * (r - 0.5 * delta))))


def closed_bce(z, t, delta=None):
    s, y = 1 / (1 + np.exp(-z)), np_one_hot(t)
    return float(np.mean(-(y * np.log(s) + (1 - y) * np.log(1 - s))))


def closed_cross_entropy(z, t, delta=None):
    return float(-np.mean(np.log(np_softmax(z)[np.arange(len(t)), t])))


CLOSED = {"mse": closed_mse, "l1": closed_l1, "huber": closed_huber}


# ---------------------------------------------------------------- ProbabilityLoss


@pytest.mark.parametrize("kind", ["mse", "l1", "huber"])
@pytest.mark.parametrize("seed", [0, 1])
def test_probability_loss_matches_closed_form(kind, seed):
    z, t = batch(seed)
    loss = ProbabilityLoss(kind=kind)(z, t)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(CLOSED[kind](z.numpy(), t.numpy()), abs=1e-12)


def test_probability_mse_by_hand_on_two_classes():
    """K = 2, logits [0, ln 3]: p = [1/4, 3/4]; target 0 gives ((3/4)^2 + (3/4)^2) / 2."""
    z = torch.tensor([[0.0, np.log(3.0)]], dtype=torch.float64)
    t = torch.tensor([0])
    assert ProbabilityLoss("mse")(z, t).item() == pytest.approx(0.5625, abs=1e-15)
    assert ProbabilityLoss("l1")(z, t).item() == pytest.approx(0.75, abs=1e-15)
    assert ProbabilityLoss("huber", delta=0.5)(z, t).item() == pytest.approx(0.5 * (0.75 - 0.25), abs=1e-15)


@pytest.mark.parametrize("delta", [0.05, 0.2, 0.5, 1.0, 3.0])
def test_probability_huber_uses_delta(delta):
    z, t = batch(2, scale=5.0)
    loss = ProbabilityLoss("huber", delta=delta)(z, t).item()
    assert loss == pytest.approx(closed_huber(z.numpy(), t.numpy(), delta), abs=1e-12)
    if delta >= 1.0:  # |p - onehot| <= 1, so huber is half the squared error throughout
        assert loss == pytest.approx(0.5 * closed_mse(z.numpy(), t.numpy()), abs=1e-12)


def test_probability_loss_ignores_delta_for_mse_and_l1():
    z, t = batch(3)
    for kind in ("mse", "l1"):
        assert ProbabilityLoss(kind, delta=0.01)(z, t).item() == ProbabilityLoss(kind, delta=5.0)(z, t).item()


# ---------------------------------------------------------------- OneVsRestBCE and ScratchCrossEntropy


@pytest.mark.parametrize("seed", [0, 1])
def test_one_vs_rest_bce_matches_closed_form(seed):
    z, t = batch(seed)
    loss = OneVsRestBCE()(z, t)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(closed_bce(z.numpy(), t.numpy()), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("scale", [1.0, 50.0])
def test_scratch_cross_entropy_equals_torch(seed, scale):
    z, t = batch(seed, scale)
    loss = ScratchCrossEntropy()(z, t)
    assert loss.shape == ()
    torch.testing.assert_close(loss, nn.CrossEntropyLoss()(z, t), rtol=1e-12, atol=1e-12)
    assert loss.item() == pytest.approx(closed_cross_entropy(z.numpy(), t.numpy()), rel=1e-12)


# ---------------------------------------------------------------- shared behaviour

LOSSES = {
    "mse": lambda: ProbabilityLoss("mse"),
    "l1": lambda: ProbabilityLoss("l1"),
    "huber": lambda: ProbabilityLoss("huber", delta=0.5),
    "bce": OneVsRestBCE,
    "scratch_cross_entropy": ScratchCrossEntropy,
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_perfect_confident_logits_give_almost_zero_loss(name):
    t = torch.arange(B) % K
    one_hot = torch.nn.functional.one_hot(t, K).double()
    confident = 50.0 * (2 * one_hot - 1)  # +50 for the target, -50 elsewhere
    loss = LOSSES[name]()(confident, t)
    assert 0 <= loss.item() < 1e-20
    wrong = LOSSES[name]()(-confident, t)
    assert wrong.item() > 0.01  # and confidently wrong logits are far from 0


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_is_a_differentiable_scalar(name):
    z, t = batch(4, scale=1.0)
    z.requires_grad_()
    loss = LOSSES[name]()(z, t)
    assert loss.shape == ()
    loss.backward()
    assert z.grad.shape == (B, K)
    assert torch.isfinite(z.grad).all()
    assert z.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_gradient_matches_finite_differences(name):
    z, t = batch(5, scale=1.0)
    z = z[:3].clone().requires_grad_()
    t = t[:3]
    loss_fn = LOSSES[name]()
    assert torch.autograd.gradcheck(lambda x: loss_fn(x, t), (z,), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"kind": "foo"}, "kind"),
        ({"kind": "MSE"}, "kind"),
        ({"delta": 0}, "delta"),
        ({"delta": -1.0}, "delta"),
        ({"delta": "1"}, "delta"),
    ],
)
def test_probability_loss_rejects_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        ProbabilityLoss(**kwargs)


# ---------------------------------------------------------------- every conf/loss choice


def closed_form_for(stem: str, cfg) -> callable:
    if stem in ("mse", "l1", "huber"):
        assert cfg.kind == stem
        return lambda z, t: CLOSED[stem](z, t, cfg.delta)
    return {"bce": closed_bce, "cross_entropy": closed_cross_entropy, "scratch_cross_entropy": closed_cross_entropy}[stem]


def test_every_loss_config_matches_its_closed_form():
    paths = sorted((CONF / "loss").rglob("*.yaml"))
    assert len(paths) == 6, paths
    z, t = batch(6)
    for path in paths:
        cfg = OmegaConf.load(path)
        loss = hydra.utils.instantiate(cfg)(z, t)
        assert loss.shape == (), path.stem
        expected = closed_form_for(path.stem, cfg)(z.numpy(), t.numpy())
        assert loss.item() == pytest.approx(expected, abs=1e-12), path.stem
