"""mlplab.scratch against torch's own functions, a NumPy reference, and extreme inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mlplab import scratch

F64 = dict(rtol=1e-12, atol=1e-12)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_logits(seed: int, b: int = 16, k: int = 10, scale: float = 3.0) -> torch.Tensor:
    return scale * torch.randn(b, k, generator=gen(seed), dtype=torch.float64)


EXTREME_LOGITS = torch.tensor(
    [
        [1000.0, -1000.0, 0.0, 3.0],
        [-1000.0, -1000.0, -1000.0, -1000.0],
        [1000.0, 1000.0, -1000.0, 999.0],
        [-1000.0, 1000.0, 500.0, -500.0],
        [0.0, 0.0, 0.0, 0.0],
    ],
    dtype=torch.float64,
)


# ---------------------------------------------------------------- softmax, log_softmax


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_softmax_matches_torch(seed):
    z = random_logits(seed)
    p = scratch.softmax(z)
    torch.testing.assert_close(p, torch.softmax(z, dim=-1), **F64)
    torch.testing.assert_close(p.sum(-1), torch.ones(16, dtype=torch.float64), **F64)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_log_softmax_matches_torch(seed):
    z = random_logits(seed)
    torch.testing.assert_close(scratch.log_softmax(z), torch.log_softmax(z, dim=-1), **F64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softmax_of_extreme_logits_is_finite_and_matches_torch(dtype):
    z = EXTREME_LOGITS.to(dtype)
    p = scratch.softmax(z)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p, torch.softmax(z, dim=-1))
    # the closed form at these logits: one-hot, uniform, a fair coin between two
    assert p[0].tolist() == [1.0, 0.0, 0.0, 0.0]
    torch.testing.assert_close(p[1], torch.full((4,), 0.25, dtype=dtype))
    torch.testing.assert_close(p[2, :2], torch.full((2,), 1 / (2 + np.exp(-1.0)), dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_softmax_of_extreme_logits_is_finite_where_torch_is(dtype):
    z = EXTREME_LOGITS.to(dtype)
    ours, ref = scratch.log_softmax(z), torch.log_softmax(z, dim=-1)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, ref)
    # z_i - max z - log sum exp(z - max z): exactly -2000 for the -1000 next to a +1000
    assert ours[0, 1].item() == pytest.approx(-2000.0, abs=1e-9)


# ---------------------------------------------------------------- cross-entropy


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_cross_entropy_matches_torch(seed, scale):
    z = random_logits(seed, scale=scale)
    t = torch.randint(0, 10, (16,), generator=gen(100 + seed))
    ours = scratch.cross_entropy(z, t)
    assert ours.shape == ()
    torch.testing.assert_close(ours, F.cross_entropy(z, t), **F64)


def test_cross_entropy_of_extreme_logits_matches_torch():
    t = torch.tensor([0, 1, 2, 0, 3])
    ours = scratch.cross_entropy(EXTREME_LOGITS, t)
    assert torch.isfinite(ours)
    torch.testing.assert_close(ours, F.cross_entropy(EXTREME_LOGITS, t), **F64)


def numpy_cross_entropy(logits: np.ndarray, targets: np.ndarray) -> float:
    """Mean over the batch of -log softmax(z)[t], written out in NumPy, max-subtracted."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    probs = e / e.sum(axis=1, keepdims=True)
    picked = probs[np.arange(len(targets)), targets]
    return float(-np.mean(np.log(picked)))


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_cross_entropy_matches_a_numpy_reference(seed):
    z = random_logits(seed, b=32, k=7, scale=4.0)
    t = torch.randint(0, 7, (32,), generator=gen(200 + seed))
    ref = numpy_cross_entropy(z.numpy(), t.numpy())
    assert scratch.cross_entropy(z, t).item() == pytest.approx(ref, abs=1e-6)
    assert F.cross_entropy(z, t).item() == pytest.approx(ref, abs=1e-6)
    # float32 inputs too, within float32 accuracy
    assert scratch.cross_entropy(z.float(), t).item() == pytest.approx(ref, abs=1e-5)


def test_cross_entropy_hand_value():
    """Logits [0, ln 3] with target 1: p = 3/4, so the loss is -ln(3/4)."""
    z = torch.tensor([[0.0, np.log(3.0)]], dtype=torch.float64)
    assert scratch.cross_entropy(z, torch.tensor([1])).item() == pytest.approx(-np.log(0.75), abs=1e-15)


@pytest.mark.parametrize("seed", [0, 1])
def test_cross_entropy_gradient_matches_torch(seed):
    z = random_logits(seed, scale=5.0)
    t = torch.randint(0, 10, (16,), generator=gen(300 + seed))
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    scratch.cross_entropy(z1, t).backward()
    F.cross_entropy(z2, t).backward()
    torch.testing.assert_close(z1.grad, z2.grad, **F64)
    # and both equal the closed form (softmax(z) - onehot(t)) / B
    closed = (torch.softmax(z, -1) - F.one_hot(t, 10).double()) / 16
    torch.testing.assert_close(z1.grad, closed, **F64)


def test_cross_entropy_gradient_is_finite_at_extreme_logits():
    t = torch.tensor([0, 1, 2, 0, 3])
    z1, z2 = EXTREME_LOGITS.clone().requires_grad_(), EXTREME_LOGITS.clone().requires_grad_()
    scratch.cross_entropy(z1, t).backward()
    F.cross_entropy(z2, t).backward()
    assert torch.isfinite(z1.grad).all()
    torch.testing.assert_close(z1.grad, z2.grad, **F64)


# ---------------------------------------------------------------- binary cross-entropy


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bce_with_logits_matches_torch(seed):
    z = random_logits(seed, scale=4.0)
    targets = torch.rand(16, 10, generator=gen(400 + seed), dtype=torch.float64)  # soft targets
    torch.testing.assert_close(
        scratch.binary_cross_entropy_with_logits(z, targets), F.binary_cross_entropy_with_logits(z, targets), **F64
    )
    hard = (targets > 0.5).double()
    torch.testing.assert_close(
        scratch.binary_cross_entropy_with_logits(z, hard), F.binary_cross_entropy_with_logits(z, hard), **F64
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bce_with_large_logits_is_finite_and_matches_torch(dtype):
    z = torch.tensor([[1e4, -1e4, 100.0, -100.0, 50.0, -50.0, 0.0, 1e4]], dtype=dtype)
    t = torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.3]], dtype=dtype)
    ours = scratch.binary_cross_entropy_with_logits(z, t)
    assert torch.isfinite(ours)
    torch.testing.assert_close(ours, F.binary_cross_entropy_with_logits(z, t))
    # term by term: 0, 0, 0, 0, 50, 50, ln 2, 1e4 * 0.7 (+ e^-x terms below float precision)
    expected = (0 + 0 + 0 + 0 + 50 + 50 + np.log(2) + 7000) / 8
    assert ours.item() == pytest.approx(expected, rel=1e-6)


def test_bce_hand_value():
    """z = 0, t = 1: -log sigmoid(0) = ln 2; z = ln 3, t = 0: -log(1 - 3/4) = ln 4."""
    z = torch.tensor([[0.0, np.log(3.0)]], dtype=torch.float64)
    t = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    assert scratch.binary_cross_entropy_with_logits(z, t).item() == pytest.approx(
        (np.log(2) + np.log(4)) / 2, abs=1e-15
    )


# ---------------------------------------------------------------- regression losses


@pytest.mark.parametrize("seed", [0, 1])
def test_mse_and_l1_match_torch(seed):
    pred = torch.randn(8, 5, generator=gen(500 + seed), dtype=torch.float64)
    target = torch.randn(8, 5, generator=gen(600 + seed), dtype=torch.float64)
    torch.testing.assert_close(scratch.mse(pred, target), F.mse_loss(pred, target), **F64)
    torch.testing.assert_close(scratch.l1(pred, target), F.l1_loss(pred, target), **F64)


def test_mse_and_l1_hand_values():
    pred = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    target = torch.tensor([0.0, 0.0, 0.5, 1.0], dtype=torch.float64)
    assert scratch.mse(pred, target).item() == pytest.approx((1 + 4 + 0 + 4) / 4, abs=1e-15)
    assert scratch.l1(pred, target).item() == pytest.approx((1 + 2 + 0 + 2) / 4, abs=1e-15)


@pytest.mark.parametrize("delta", [0.1, 0.5, 1.0, 2.0, 5.0])
def test_huber_matches_torch_on_both_sides_of_delta(delta):
    pred = 3 * torch.randn(64, generator=gen(700), dtype=torch.float64)
    target = torch.zeros(64, dtype=torch.float64)
    r = pred.abs()
    if delta < 5.0:
        assert (r < delta).any() and (r > delta).any()  # residuals on both sides
    ours = scratch.huber(pred, target, delta=delta)
    torch.testing.assert_close(ours, F.huber_loss(pred, target, delta=delta), **F64)
    closed = np.mean([0.5 * x**2 if x <= delta else delta * (x - 0.5 * delta) for x in r.tolist()])
    assert ours.item() == pytest.approx(closed, abs=1e-12)


@pytest.mark.parametrize("delta", [0.5, 1.0, 2.0])
def test_huber_hand_values_including_exactly_delta(delta):
    r = torch.tensor([0.0, delta / 2, delta, 2 * delta, -3 * delta], dtype=torch.float64)
    zeros = torch.zeros_like(r)
    # 0.5 r^2 up to delta, then delta (|r| - delta/2): continuous at |r| = delta
    expected = [0.0, delta**2 / 8, delta**2 / 2, 1.5 * delta**2, 2.5 * delta**2]
    assert scratch.huber(r, zeros, delta=delta).item() == pytest.approx(np.mean(expected), abs=1e-12)
    torch.testing.assert_close(scratch.huber(r, zeros, delta=delta), F.huber_loss(r, zeros, delta=delta), **F64)


def test_huber_default_delta_is_one():
    pred = torch.tensor([0.5, 3.0], dtype=torch.float64)
    target = torch.zeros(2, dtype=torch.float64)
    assert scratch.huber(pred, target).item() == pytest.approx((0.125 + 2.5) / 2, abs=1e-15)
