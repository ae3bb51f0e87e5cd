"""mlplab.information against textbook values, closed forms and the identities that tie them."""

from __future__ import annotations

import math

import pytest
import torch

from mlplab.information import cross_entropy, entropy, entropy_from_logits, kl_divergence

LN2 = math.log(2)


def random_distributions(shape: tuple[int, ...], seed: int, zeros: bool) -> torch.Tensor:
    """(..., K) float64 probability rows; with zeros=True about a third of the entries are exactly 0
    (never a whole row), so the 0 log 0 = 0 convention is exercised."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(shape, generator=g, dtype=torch.float64) + 1e-3
    if zeros:
        mask = torch.rand(shape, generator=g) < 1 / 3
        mask[..., 0] = False  # every row keeps at least one positive entry
        w = w.masked_fill(mask, 0.0)
    return w / w.sum(-1, keepdim=True)


def entropy_by_hand(p: list[float], base: float) -> float:
    return -sum(x * math.log(x, base) for x in p if x > 0)


# ---------------------------------------------------------------- textbook values


@pytest.mark.parametrize(
    ("p", "bits"),
    [
        ([0.25] * 4, 2.0),
        ([0.1, 0.1, 0.1, 0.7], 1.3568),
        ([0.001, 0.001, 0.001, 0.999], 0.0313),
        ([0.5, 0.5], 1.0),
        ([1.0, 0.0, 0.0], 0.0),
    ],
)
def test_entropy_textbook_values_in_bits(p, bits):
    h = entropy(torch.tensor(p, dtype=torch.float64))
    assert h.shape == ()
    assert h.item() == pytest.approx(bits, abs=1e-4)
    assert h.item() == pytest.approx(entropy_by_hand(p, 2), abs=1e-12)


@pytest.mark.parametrize(
    ("q", "nats"),
    [
        ([0.4, 0.3, 0.05, 0.05, 0.2], 0.9163),  # -ln 0.4
        ([0.98, 0.01, 0.0, 0.0, 0.01], 0.0202),  # -ln 0.98; q's zeros sit where p is 0
    ],
)
def test_cross_entropy_textbook_values_in_nats(q, nats):
    p = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    q = torch.tensor(q, dtype=torch.float64)
    h = cross_entropy(p, q, base=math.e)
    assert h.item() == pytest.approx(nats, abs=1e-4)
    assert h.item() == pytest.approx(-math.log(q[0].item()), abs=1e-12)
    # p is one-hot, so H(p) = 0 and KL(p || q) is the whole cross-entropy
    assert kl_divergence(p, q, base=math.e).item() == pytest.approx(-math.log(q[0].item()), abs=1e-12)


@pytest.mark.parametrize("a", [0.01, 0.2, 0.5, 0.9])
def test_binary_entropy_closed_form(a):
    """H(a, 1 - a) = -a log2 a - (1 - a) log2 (1 - a)."""
    h = entropy(torch.tensor([a, 1 - a], dtype=torch.float64))
    assert h.item() == pytest.approx(-a * math.log2(a) - (1 - a) * math.log2(1 - a), abs=1e-12)


def test_cross_entropy_and_kl_against_the_sum_written_out():
    p = random_distributions((6, 7), seed=1, zeros=True)
    q = random_distributions((6, 7), seed=2, zeros=False)
    for i in range(6):
        pi, qi = p[i].tolist(), q[i].tolist()
        ce = -sum(a * math.log2(b) for a, b in zip(pi, qi) if a > 0)
        kl = sum(a * math.log2(a / b) for a, b in zip(pi, qi) if a > 0)
        assert cross_entropy(p[i], q[i]).item() == pytest.approx(ce, abs=1e-12)
        assert kl_divergence(p[i], q[i]).item() == pytest.approx(kl, abs=1e-12)


def test_cross_entropy_is_infinite_where_q_is_zero_but_p_is_not():
    p = torch.tensor([0.5, 0.5], dtype=torch.float64)
    q = torch.tensor([1.0, 0.0], dtype=torch.float64)
    assert cross_entropy(p, q).item() == math.inf
    assert kl_divergence(p, q).item() == math.inf


# ---------------------------------------------------------------- identities on random batches


@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize("base", [2.0, math.e])
def test_cross_entropy_is_entropy_plus_kl(zeros, base):
    p = random_distributions((3, 4, 9), seed=10, zeros=zeros)
    q = random_distributions((3, 4, 9), seed=11, zeros=False)
    h_pq, h_p, kl = cross_entropy(p, q, base), entropy(p, base), kl_divergence(p, q, base)
    assert h_pq.shape == h_p.shape == kl.shape == (3, 4)
    torch.testing.assert_close(h_pq, h_p + kl, rtol=0, atol=1e-12)


@pytest.mark.parametrize("zeros", [False, True])
def test_kl_is_nonnegative_and_zero_only_against_itself(zeros):
    p = random_distributions((3, 4, 9), seed=20, zeros=zeros)
    q = random_distributions((3, 4, 9), seed=21, zeros=False)
    kl = kl_divergence(p, q)
    assert torch.isfinite(kl).all()
    assert (kl > 0).all()  # p != q row by row, so Gibbs' inequality is strict
    kl_self = kl_divergence(p, p)
    assert not torch.isnan(kl_self).any()
    torch.testing.assert_close(kl_self, torch.zeros(3, 4, dtype=torch.float64), rtol=0, atol=1e-15)


def test_kl_with_shared_zeros_is_finite():
    """p and q both 0 in a slot: the slot contributes 0, not 0 * (log 0 - log 0) = NaN."""
    p = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    q = torch.tensor([0.25, 0.75, 0.0], dtype=torch.float64)
    expected = 0.5 * math.log2(0.5 / 0.25) + 0.5 * math.log2(0.5 / 0.75)
    assert kl_divergence(p, q).item() == pytest.approx(expected, abs=1e-12)
    assert cross_entropy(p, q).item() == pytest.approx(-0.5 * math.log2(0.25) - 0.5 * math.log2(0.75), abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_entropy_of_one_hot_is_zero_without_nan(dtype):
    p = torch.eye(5, dtype=dtype).reshape(1, 5, 5).expand(3, 5, 5)
    h = entropy(p)
    assert h.shape == (3, 5)
    assert not torch.isnan(h).any()
    assert (h == 0).all()


@pytest.mark.parametrize("k", [2, 3, 10, 64])
def test_entropy_is_at_most_log_k_with_equality_for_uniform(k):
    uniform = torch.full((k,), 1 / k, dtype=torch.float64)
    assert entropy(uniform).item() == pytest.approx(math.log2(k), abs=1e-12)
    assert entropy(uniform, base=math.e).item() == pytest.approx(math.log(k), abs=1e-12)
    p = random_distributions((3, 4, k), seed=k, zeros=True)
    assert (entropy(p) < math.log2(k)).all()  # none of these rows is uniform
    assert (entropy(p) >= 0).all()


@pytest.mark.parametrize("fn", ["entropy", "cross_entropy", "kl_divergence"])
def test_bits_are_nats_over_ln2(fn):
    p = random_distributions((3, 4, 6), seed=30, zeros=True)
    q = random_distributions((3, 4, 6), seed=31, zeros=False)
    args = {"entropy": (p,), "cross_entropy": (p, q), "kl_divergence": (p, q)}[fn]
    f = {"entropy": entropy, "cross_entropy": cross_entropy, "kl_divergence": kl_divergence}[fn]
    bits, nats = f(*args, base=2.0), f(*args, base=math.e)
    torch.testing.assert_close(bits, nats / LN2, rtol=1e-12, atol=0)
    torch.testing.assert_close(f(*args), bits, rtol=0, atol=0)  # base=2 is the default


def test_batched_shape_is_the_leading_dims():
    p = random_distributions((3, 4, 5), seed=40, zeros=True)
    q = random_distributions((3, 4, 5), seed=41, zeros=False)
    logits = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(42))
    for value in (entropy(p), cross_entropy(p, q), kl_divergence(p, q), entropy_from_logits(logits)):
        assert value.shape == (3, 4)
    # each batch entry is the value of its own row
    assert entropy(p)[2, 1].item() == pytest.approx(entropy_by_hand(p[2, 1].tolist(), 2), abs=1e-12)


# ---------------------------------------------------------------- entropy_from_logits


@pytest.mark.parametrize("base", [2.0, math.e])
@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0])
def test_entropy_from_logits_equals_entropy_of_softmax(base, scale):
    z = scale * torch.randn(3, 4, 10, generator=torch.Generator().manual_seed(50), dtype=torch.float64)
    expected = entropy(torch.softmax(z, dim=-1), base=base)
    # entropy_from_logits works in float32 (see the report), hence 1e-5 rather than 1e-12
    torch.testing.assert_close(entropy_from_logits(z, base=base).double(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("logits", "bits"),
    [
        ([1000.0, 0.0, -1000.0], 0.0),  # certain prediction
        ([1000.0, 1000.0, -1000.0], 1.0),  # a fair coin between two classes
        ([-1000.0, -1000.0, -1000.0, -1000.0], 2.0),  # uniform over four
        ([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], 3.0),
    ],
)
def test_entropy_from_logits_is_finite_for_extreme_logits(logits, bits):
    h = entropy_from_logits(torch.tensor(logits))
    assert torch.isfinite(h)
    assert h.item() == pytest.approx(bits, abs=1e-6)


def test_entropy_from_logits_with_a_masked_logit():
    z = torch.tensor([0.0, 0.0, -math.inf])
    assert entropy(torch.softmax(z, dim=-1)).item() == pytest.approx(1.0, abs=1e-6)
    assert entropy_from_logits(z).item() == pytest.approx(1.0, abs=1e-6)


def test_cross_entropy_gradient_is_finite_where_q_is_zero_and_p_is_zero():
    p = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    q = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64, requires_grad=True)
    (cross_entropy(p, q) + kl_divergence(p, q)).backward()
    assert torch.isfinite(q.grad).all()
    # d/dq_i of -sum p_i log2 q_i is -p_i / (q_i ln 2), and KL adds the same
    expected = torch.tensor([2 * -0.5 / (0.5 * math.log(2))] * 2 + [0.0], dtype=torch.float64)
    assert torch.allclose(q.grad, expected)
