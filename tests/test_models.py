"""mlplab.models.MLP: structure, initialisation statistics, argument checks, and every
activation choice in conf/activation/ against its closed form."""

from __future__ import annotations

import math
from pathlib import Path

import hydra.utils
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from mlplab.models import MLP

CONF = Path(__file__).resolve().parents[1] / "conf"


def kinds(model: MLP) -> list[str]:
    return [type(m).__name__ for m in model.layers]


# ---------------------------------------------------------------- structure


def test_default_is_784_200_200_10_with_relu():
    torch.manual_seed(0)
    model = MLP(784, 10)
    assert isinstance(model.layers, nn.Sequential)
    assert [(m.in_features, m.out_features) for m in model.linears] == [(784, 200), (200, 200), (200, 10)]
    assert kinds(model) == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert model(torch.randn(5, 784)).shape == (5, 10)


@pytest.mark.parametrize("hidden", [[], [7], [32, 16], [8, 8, 8]])
def test_output_shape_and_layer_sizes(hidden):
    model = MLP(20, 3, hidden_sizes=hidden)
    sizes = [20, *hidden, 3]
    assert [(m.in_features, m.out_features) for m in model.linears] == list(zip(sizes[:-1], sizes[1:]))
    assert model(torch.randn(4, 20)).shape == (4, 3)


def test_no_hidden_layer_is_softmax_regression():
    model = MLP(784, 10, hidden_sizes=[])
    assert kinds(model) == ["Linear"]
    (lin,) = model.linears
    assert (lin.in_features, lin.out_features) == (784, 10)
    x = torch.randn(3, 784)
    torch.testing.assert_close(model(x), x @ lin.weight.T + lin.bias, rtol=1e-6, atol=1e-6)


def test_activations_sit_between_hidden_layers_only():
    model = MLP(10, 4, hidden_sizes=[6, 5], activation=nn.Tanh())
    assert kinds(model) == ["Linear", "Tanh", "Linear", "Tanh", "Linear"]
    # the logits are linear: they can be negative and exceed tanh's range
    torch.manual_seed(0)
    out = MLP(10, 4, hidden_sizes=[6], activation=nn.Tanh(), init="normal", init_std=5.0)(torch.randn(50, 10))
    assert out.abs().max() > 1


def test_output_activation_adds_one_after_the_last_linear():
    model = MLP(10, 4, hidden_sizes=[6, 5], output_activation=True)
    assert kinds(model) == ["Linear", "ReLU", "Linear", "ReLU", "Linear", "ReLU"]
    assert (model(torch.randn(50, 10)) >= 0).all()
    assert kinds(MLP(10, 4, hidden_sizes=[], output_activation=True)) == ["Linear", "ReLU"]


def test_activation_is_copied_per_layer():
    act = nn.PReLU()
    model = MLP(10, 4, hidden_sizes=[6, 5], activation=act)
    prelus = [m for m in model.layers if isinstance(m, nn.PReLU)]
    assert len(prelus) == 2
    assert prelus[0] is not prelus[1] and act not in prelus


@pytest.mark.parametrize("output_activation", [False, True])
def test_dropout_follows_each_hidden_activation(output_activation):
    model = MLP(10, 4, hidden_sizes=[6, 5], dropout=0.25, output_activation=output_activation)
    expected = ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert kinds(model) == expected + (["ReLU"] if output_activation else [])
    assert all(m.p == 0.25 for m in model.layers if isinstance(m, nn.Dropout))
    assert not any(isinstance(m, nn.Dropout) for m in MLP(10, 4, hidden_sizes=[6, 5], dropout=0.0).layers)
    assert not any(isinstance(m, nn.Dropout) for m in MLP(10, 4, hidden_sizes=[], dropout=0.5).layers)


def test_dropout_acts_in_train_mode_only():
    torch.manual_seed(0)
    model = MLP(10, 4, hidden_sizes=[64], dropout=0.5)
    x = torch.randn(8, 10)
    model.eval()
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
    model.train()
    assert not torch.equal(model(x), model(x))


# ---------------------------------------------------------------- normalisation


@pytest.mark.parametrize(("norm", "kind"), [("batch", "BatchNorm1d"), ("layer", "LayerNorm")])
def test_norm_sits_after_each_hidden_linear_before_its_activation(norm, kind):
    model = MLP(10, 4, hidden_sizes=[6, 5], norm=norm, dropout=0.1)
    assert kinds(model) == ["Linear", kind, "ReLU", "Dropout", "Linear", kind, "ReLU", "Dropout", "Linear"]
    norms = [m for m in model.layers if type(m).__name__ == kind]
    assert [m.weight.shape[0] for m in norms] == [6, 5]  # one scale per unit of its layer
    assert [type(a).__name__ for _, a in model.hidden_layers] == ["ReLU", "ReLU"]
    assert [lin.out_features for lin, _ in model.hidden_layers] == [6, 5]
    assert model(torch.randn(3, 10)).shape == (3, 4)
    assert kinds(MLP(10, 4, hidden_sizes=[], norm=norm)) == ["Linear"]  # no hidden layer, nothing to normalise


def pre_activations(model: MLP, x: torch.Tensor) -> torch.Tensor:
    """The input of the first hidden activation: Linear, then the norm."""
    seen = []
    handle = model.hidden_layers[0][1].register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    model(x)
    handle.remove()
    return seen[0].detach().double()


def test_batch_norm_standardises_each_unit_over_the_batch_and_tracks_running_stats():
    torch.manual_seed(0)
    model = MLP(30, 4, hidden_sizes=[50], norm="batch", init="normal", init_std=2.0)
    x = 3 + 5 * torch.randn(400, 30)
    z = pre_activations(model.train(), x)
    torch.testing.assert_close(z.mean(0), torch.zeros(50, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.var(0, unbiased=False), torch.ones(50, dtype=torch.float64), atol=1e-3, rtol=0)
    bn = model.layers[1]
    h = model.linears[0](x).detach()
    torch.testing.assert_close(bn.running_mean, 0.1 * h.mean(0))  # momentum 0.1 from 0
    # eval mode normalises with the running statistics, not the batch's
    z_eval = pre_activations(model.eval(), x[:2])
    expected = (h[:2] - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(z_eval, expected.double(), atol=1e-5, rtol=1e-5)
    model.reset_parameters()
    assert (bn.running_mean == 0).all() and (bn.running_var == 1).all()


def test_layer_norm_standardises_each_sample_over_its_units():
    torch.manual_seed(0)
    model = MLP(30, 4, hidden_sizes=[50], norm="layer", init="normal", init_std=2.0)
    z = pre_activations(model, 3 + 5 * torch.randn(8, 30))
    torch.testing.assert_close(z.mean(1), torch.zeros(8, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.var(1, unbiased=False), torch.ones(8, dtype=torch.float64), atol=1e-3, rtol=0)


def test_selu_with_lecun_normal_keeps_activations_near_mean_0_std_1_through_10_layers():
    torch.manual_seed(0)
    model = MLP(100, 10, hidden_sizes=[500] * 10, activation=nn.SELU(), init="lecun_normal")
    outputs = []
    handles = [a.register_forward_hook(lambda m, inp, out: outputs.append(out.detach())) for _, a in model.hidden_layers]
    model(torch.randn(1000, 100))
    for h in handles:
        h.remove()
    for a in outputs:  # the self-normalising fixed point (Klambauer et al. 2017)
        assert abs(a.mean().item()) < 0.1 and abs(a.std().item() - 1) < 0.1


# ---------------------------------------------------------------- initialisation


def wide_layer(init: str, **kwargs) -> nn.Linear:
    """One 784 -> 2000 Linear: 1.57M weights, so the sample std is within ~0.1% of the true one."""
    torch.manual_seed(1234)
    (lin,) = MLP(784, 2000, hidden_sizes=[], init=init, **kwargs).linears
    return lin


@pytest.mark.parametrize(
    ("init", "kwargs", "std"),
    [
        ("kaiming_normal", {}, math.sqrt(2 / 784)),
        ("lecun_normal", {}, 1 / math.sqrt(784)),
        ("xavier", {}, math.sqrt(2 / (784 + 2000))),
        ("normal", {"init_std": 0.01}, 0.01),
        ("normal", {"init_std": 0.3}, 0.3),
    ],
)
def test_normal_inits_have_the_closed_form_std_and_zero_bias(init, kwargs, std):
    lin = wide_layer(init, **kwargs)
    w = lin.weight.detach().double()
    assert w.std().item() == pytest.approx(std, rel=0.02)
    assert abs(w.mean().item()) < 0.01 * std
    assert (lin.bias == 0).all()
    # normal, not uniform: about 4.6% of draws lie beyond 2 std (a uniform has none)
    assert (w.abs() > 2 * std).double().mean().item() == pytest.approx(0.0455, abs=0.003)


def test_default_init_is_pytorch_uniform():
    lin = wide_layer("default")
    bound = 1 / math.sqrt(784)
    w, b = lin.weight.detach().double(), lin.bias.detach().double()
    assert w.abs().max().item() <= bound
    assert w.abs().max().item() > 0.999 * bound  # fills the interval
    assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)  # uniform(-a, a) has std a/sqrt(3)
    assert b.abs().max().item() <= bound
    assert (b != 0).all()
    assert b.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)  # 2000 biases


@pytest.mark.parametrize("init", ["kaiming_normal", "lecun_normal", "xavier", "normal"])
def test_init_reaches_every_layer(init):
    torch.manual_seed(7)
    model = MLP(784, 10, hidden_sizes=[1000, 500], init=init, init_std=0.05)
    for lin in model.linears:
        fan_in, fan_out = lin.in_features, lin.out_features
        std = {"kaiming_normal": math.sqrt(2 / fan_in), "lecun_normal": 1 / math.sqrt(fan_in),
               "xavier": math.sqrt(2 / (fan_in + fan_out)), "normal": 0.05}[init]
        assert lin.weight.detach().std().item() == pytest.approx(std, rel=0.05), (fan_in, fan_out)
        assert (lin.bias == 0).all()


def test_reset_parameters_redraws_with_the_same_scheme():
    torch.manual_seed(0)
    model = MLP(20, 3, hidden_sizes=[8], init="normal", init_std=0.2)
    before = [lin.weight.detach().clone() for lin in model.linears]
    with torch.no_grad():
        for lin in model.linears:
            lin.bias.fill_(1.0)
    model.reset_parameters()
    for lin, w in zip(model.linears, before):
        assert not torch.equal(lin.weight, w)
        assert (lin.bias == 0).all()


# ---------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"hidden_sizes": [0]}, "hidden_sizes"),
        ({"hidden_sizes": [-3]}, "hidden_sizes"),
        ({"hidden_sizes": [200, 0]}, "hidden_sizes"),
        ({"hidden_sizes": [2.5]}, "hidden_sizes"),
        ({"hidden_sizes": [True]}, "hidden_sizes"),
        ({"init": "foo"}, "init"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"init_std": 0}, "init_std"),
        ({"init_std": -0.01}, "init_std"),
        ({"norm": "group"}, "norm"),
        ({"norm": "Batch"}, "norm"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, argument):
    with pytest.raises(ValueError, match=rf"\b{argument}="):
        MLP(784, 10, **kwargs)


# ---------------------------------------------------------------- activations, from conf/activation/

SELU_LAMBDA, SELU_ALPHA = 1.0507009873554805, 1.6732632423543772


def leaky_relu(cfg, x):
    return x if x > 0 else cfg.get("negative_slope", 0.01) * x


def softplus(cfg, x):
    beta = cfg.get("beta", 1.0)
    return math.log1p(math.exp(beta * x)) / beta


def elu(cfg, x):
    return x if x > 0 else cfg.get("alpha", 1.0) * (math.exp(x) - 1)


# file stem -> f(cfg, x) for one float x, written from the formula, no torch
CLOSED_FORMS = {
    "relu": lambda cfg, x: max(0.0, x),
    "leaky_relu": leaky_relu,
    "selu": lambda cfg, x: SELU_LAMBDA * (x if x > 0 else SELU_ALPHA * (math.exp(x) - 1)),
    "softplus": softplus,
    "sigmoid": lambda cfg, x: 1 / (1 + math.exp(-x)),
    "tanh": lambda cfg, x: math.tanh(x),
    "gelu": lambda cfg, x: 0.5 * x * (1 + math.erf(x / math.sqrt(2))),
    "elu": elu,
}

X = torch.tensor([-6.0, -3.0, -1.5, -1.0, -0.5, -0.1, 0.0, 0.1, 0.5, 1.0, 1.5, 3.0, 6.0], dtype=torch.float64)
ACTIVATION_FILES = sorted((CONF / "activation").rglob("*.yaml"))


def test_found_every_activation_config():
    assert len(ACTIVATION_FILES) == 8, ACTIVATION_FILES
    assert {p.stem for p in ACTIVATION_FILES} == set(CLOSED_FORMS)


@pytest.mark.parametrize("path", ACTIVATION_FILES, ids=lambda p: p.stem)
def test_activation_config_matches_closed_form(path):
    assert path.stem in CLOSED_FORMS, f"no closed form for {path}"
    cfg = OmegaConf.load(path)
    act = hydra.utils.instantiate(cfg)
    assert isinstance(act, nn.Module)
    expected = torch.tensor([CLOSED_FORMS[path.stem](cfg, x) for x in X.tolist()], dtype=torch.float64)
    torch.testing.assert_close(act(X), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path", ACTIVATION_FILES, ids=lambda p: p.stem)
def test_activation_in_the_model_matches_closed_form(path):
    """The MLP's forward equals W2 f(W1 x + b1) + b2 with f the closed form, per element."""
    cfg = OmegaConf.load(path)
    torch.manual_seed(3)
    model = MLP(4, 3, hidden_sizes=[5], activation=hydra.utils.instantiate(cfg), init="normal", init_std=1.0).double()
    with torch.no_grad():
        model.linears[0].bias.copy_(torch.linspace(-1, 1, 5))
    x = torch.randn(6, 4, dtype=torch.float64)
    first, last = model.linears
    h = (x @ first.weight.T + first.bias).detach()
    f_h = torch.tensor([[CLOSED_FORMS[path.stem](cfg, v) for v in row] for row in h.tolist()], dtype=torch.float64)
    expected = f_h @ last.weight.detach().T + last.bias.detach()
    torch.testing.assert_close(model(x).detach(), expected, rtol=1e-12, atol=1e-12)
