"""mlplab.diagnostics: each statistic against values computed by hand on tiny networks, and the callback
in real runs (history.json, metrics.json, TensorBoard, the switch, no effect on training)."""

from __future__ import annotations

import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from conftest import compose_config, read_json
from mlplab.diagnostics import NAMES, LayerDiagnostics, layer_statistics, tag
from mlplab.evaluate import evaluate
from mlplab.models import MLP
from mlplab.config import ConfigError
from mlplab.train import run

CE = nn.CrossEntropyLoss()


def identity_net(activation: nn.Module, width: int = 2) -> MLP:
    """`width` inputs -> one hidden layer with W = I, b = 0 -> 2 logits: the activation sees the inputs."""
    model = MLP(width, 2, hidden_sizes=[width], activation=activation).double()
    with torch.no_grad():
        model.linears[0].weight.copy_(torch.eye(width))
        model.linears[0].bias.zero_()
    return model


def test_hand_computed_dead_fraction_mean_std_and_relu_saturation():
    # unit 0 sees 1, -2, 3, 0; unit 1 sees -1, -2, 0, -5: after ReLU unit 0 outputs 1, 0, 3, 0 and unit 1 nothing
    x = torch.tensor([[1.0, -1.0], [-2.0, -2.0], [3.0, 0.0], [0.0, -5.0]], dtype=torch.float64)
    values = layer_statistics(identity_net(nn.ReLU()), CE, x, torch.tensor([0, 1, 0, 1]), 0.01)
    assert values[tag(1, "dead_fraction")].item() == 0.5  # unit 1 is <= 0 on every image, unit 0 is not
    outputs = [1.0, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0]
    mean = sum(outputs) / 8
    std = math.sqrt(sum((o - mean) ** 2 for o in outputs) / 7)  # torch.std: n - 1
    assert values[tag(1, "act_mean")].item() == pytest.approx(mean, abs=1e-12)
    assert values[tag(1, "act_std")].item() == pytest.approx(std, abs=1e-12)
    # ReLU'(z) = 0 for z < 0 and, in torch, at z = 0: 6 of the 8 (image, unit) pairs
    assert values[tag(1, "saturated_fraction")].item() == 6 / 8


def test_saturation_comes_from_the_derivative_of_any_activation():
    # Hardtanh is in no list: its slope is 1 on (-1, 1) and 0 outside; Tanh's slope 1 - tanh(z)^2 < 0.01 for |z| > 2.99
    x = torch.tensor([[0.5, -3.0], [2.0, 0.0], [-0.2, 4.0]], dtype=torch.float64)
    y = torch.tensor([0, 1, 0])
    assert layer_statistics(identity_net(nn.Hardtanh()), CE, x, y, 0.01)[tag(1, "saturated_fraction")].item() == pytest.approx(3 / 6)
    assert layer_statistics(identity_net(nn.Tanh()), CE, x, y, 0.01)[tag(1, "saturated_fraction")].item() == pytest.approx(2 / 6)
    # LeakyReLU never has a zero slope: with a threshold above its negative slope its negative inputs count
    leaky = identity_net(nn.LeakyReLU(0.01))
    assert layer_statistics(leaky, CE, x, y, 0.01)[tag(1, "saturated_fraction")].item() == 0
    assert layer_statistics(leaky, CE, x, y, 0.02)[tag(1, "saturated_fraction")].item() == pytest.approx(3 / 6)


def test_a_layer_forced_dead_reads_1_dead_and_a_saturated_sigmoid_layer_reads_1_saturated():
    torch.manual_seed(0)
    x, y = torch.randn(64, 20), torch.randint(0, 3, (64,))
    relu = MLP(20, 3, hidden_sizes=[16, 8])
    with torch.no_grad():
        relu.linears[1].bias.fill_(-1e3)  # every input of layer 2 is negative: every unit outputs 0
    values = layer_statistics(relu, CE, x, y, 0.01)
    assert values[tag(2, "dead_fraction")].item() == 1.0
    assert values[tag(2, "act_mean")].item() == 0 and values[tag(2, "act_std")].item() == 0
    assert values[tag(1, "dead_fraction")].item() < 0.5  # layer 1 is alive
    assert values[tag(1, "grad_norm")].item() == 0  # nothing flows back through the dead layer

    sigmoid = MLP(20, 3, hidden_sizes=[16, 8], activation=nn.Sigmoid(), init="normal", init_std=20.0)
    values = layer_statistics(sigmoid, CE, x, y, 0.01)
    # |z| ~ 20 * sqrt(20) ~ 90 in layer 1: sigmoid'(z) < 0.01 needs only |z| > 4.6
    assert values[tag(1, "saturated_fraction")].item() > 0.95
    assert values[tag(1, "dead_fraction")].item() == 0  # a sigmoid is never <= 0


@pytest.mark.parametrize("norm", [None, "batch", "layer"])
def test_grad_norms_equal_torchs_own_and_leave_grad_alone(norm):
    torch.manual_seed(1)
    model = MLP(12, 4, hidden_sizes=[10, 9, 8], activation=nn.Tanh(), norm=norm).eval()
    x, y = torch.randn(32, 12), torch.randint(0, 4, (32,))
    values = layer_statistics(model, CE, x, y, 0.01)
    assert all(p.grad is None for p in model.parameters())  # autograd.grad: no .grad written
    CE(model(x), y).backward()
    for i, lin in enumerate(model.linears[:3], start=1):
        assert values[tag(i, "grad_norm")].item() == pytest.approx(lin.weight.grad.norm().item(), rel=1e-6)
    assert not any(name.startswith("diagnostics/layer_4") for name in values)  # hidden layers only
    assert len(values) == 3 * len(NAMES)


def test_probe_size_and_threshold_are_checked():
    with pytest.raises(ValueError, match=r"probe_size=0"):
        LayerDiagnostics(probe_size=0)
    with pytest.raises(ValueError, match=r"saturation_threshold=-1"):
        LayerDiagnostics(saturation_threshold=-1)


# ---------------------------------------------------------------- in real runs


@pytest.mark.parametrize("value", [0, 1.5, "high", True])
def test_acc_threshold_out_of_range_is_a_config_error(value, data_root, tmp_path):
    with pytest.raises(ConfigError, match=r"^acc_threshold=.* must be a number in \(0, 1\]"):
        run(compose_config([f"acc_threshold={value}"], tmp_path, data_root))

DEEP = ["model.hidden_sizes=[12,10,8]", "trainer.max_epochs=2"]


def test_every_layer_reaches_history_metrics_and_tensorboard_and_the_switch_turns_them_off(data_root, tmp_path):
    record = run(compose_config([*DEEP, "activation=sigmoid"], tmp_path / "on", data_root))
    names = [tag(i, name) for i in (1, 2, 3) for name in NAMES]
    history = read_json(tmp_path / "on" / "history.json")
    assert len(history) == 2 and all(name in row for row in history for name in names)
    assert all(name in record["metrics"] for name in names)
    assert read_json(tmp_path / "on" / "metrics.json")["metrics"][names[0]] == record["metrics"][names[0]]
    events = EventAccumulator(str(tmp_path / "on"), size_guidance={"scalars": 0}).Reload()
    assert set(names) <= set(events.Tags()["scalars"])
    steps = [e.step for e in events.Scalars(names[0])]
    assert steps == [e.step for e in events.Scalars("val/acc")][-2:]  # one point per epoch, on the step axis
    # epochs to the dataset's val/acc threshold (0.97 for MNIST), as the sweep report reads it
    reached = [row["epoch"] + 1 for row in history if row["val/acc"] >= 0.97]
    assert record["convergence"] == {"metric": "val/acc", "threshold": 0.97, "epochs": reached[0] if reached else None}
    off = run(compose_config([*DEEP, "activation=sigmoid", "~callbacks.layer_diagnostics", "acc_threshold=0.05"],
                             tmp_path / "off", data_root))
    assert off["convergence"] == {"metric": "val/acc", "threshold": 0.05, "epochs": 1}
    assert not any(name.startswith("diagnostics/") for name in off["metrics"])
    # measured in eval mode with autograd.grad: training is the same with and without them
    assert off["history"][-1]["val/acc"] == record["history"][-1]["val/acc"]
    assert off["metrics"]["test/loss"] == record["metrics"]["test/loss"]


@pytest.mark.parametrize("overrides", [["model.norm=batch", "model.dropout=0.2"], ["model.norm=layer"],
                                       ["model.init=lecun_normal", "activation=selu"]],
                         ids=["batch", "layer", "lecun_selu"])
def test_norm_and_init_train_resume_and_evaluate(overrides, data_root, tmp_path):
    # scheduler=step: the cosine's length is max_epochs, which the shorter first part changes
    common = [*overrides, "model.hidden_sizes=[16,16]", "scheduler=step", "~callbacks.parameter_histograms"]
    reference = run(compose_config([*common, "trainer.max_epochs=2"], tmp_path / "reference", data_root))
    run(compose_config([*common, "trainer.max_epochs=1"], tmp_path / "resumed", data_root))
    last = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    resumed = run(compose_config([*common, "trainer.max_epochs=2", f"ckpt_path={last}"], tmp_path / "resumed",
                                 data_root))
    assert resumed["epochs"] == reference["epochs"] == 2
    assert resumed["history"] == reference["history"]  # diagnostics included: the running statistics resumed too
    assert resumed["metrics"]["test/acc"] == reference["metrics"]["test/acc"]
    # the checkpoint alone rebuilds the model (norm layers and their running statistics) and re-tests it
    assert evaluate(tmp_path / "resumed" / "checkpoints" / "best.ckpt")["test/acc"] == pytest.approx(
        resumed["metrics"]["test/acc"], abs=1e-6)
    if "model.norm=batch" in overrides:
        state = torch.load(last, weights_only=True)["state_dict"]
        assert "model.layers.1.running_mean" in state and state["model.layers.1.num_batches_tracked"] > 0


def test_a_model_without_hidden_layers_has_nothing_to_describe(data_root, tmp_path):
    """Softmax regression: no hidden layer, no diagnostics, and the run goes on."""
    assert layer_statistics(MLP(12, 4, hidden_sizes=[], activation=nn.ReLU()), CE, torch.randn(8, 12),
                            torch.randint(0, 4, (8,)), 0.01) == {}
    record = run(compose_config(["model=softmax_regression"], tmp_path, data_root))
    assert record["status"] == "ok" and not any(k.startswith("diagnostics/") for k in record["metrics"])
