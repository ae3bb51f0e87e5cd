"""Plain nn.Modules: the MLP, and softmax regression as an MLP with no hidden layer."""

from __future__ import annotations

import copy

from torch import Tensor, nn

INITS = ("kaiming_normal", "lecun_normal", "xavier", "normal", "default")
NORMS = {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm}  # model.norm -> the module, built with the layer's width


class MLP(nn.Module):
    """Linear layers with an activation between them; linear logits unless asked otherwise.

    Args:
        in_features: inputs per sample (784 for 28x28 images); filled in from the dataset.
        num_classes: logits per sample; filled in from the dataset.
        hidden_sizes: width of each hidden layer; [] gives softmax regression (one Linear).
        activation: module applied after each hidden layer (copied per layer).
        init: "kaiming_normal" (fan-in, ReLU gain: std sqrt(2 / fan_in)), "lecun_normal" (std
            1 / sqrt(fan_in), what SELU's self-normalisation assumes), "xavier" (normal), "normal"
            (std=init_std), or "default" (PyTorch's own Linear init). Biases start at zero except for "default".
        init_std: the standard deviation for init="normal".
        norm: None, "batch" (BatchNorm1d) or "layer" (LayerNorm), after each hidden Linear and before
            its activation. BatchNorm's running mean and variance are buffers: they are saved in the
            checkpoint and used in eval mode (validation, test, scripts/evaluate.py); under DDP the
            trainer configs set sync_batchnorm, so the batch statistics are those of all ranks' batches.
        dropout: probability of zeroing a hidden unit, applied after each activation.
        output_activation: also apply `activation` to the logits. Only for reproducing the old
            tutorial quirk: a ReLU there leaves classes whose logit starts negative untrained.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden_sizes: list[int] = (200, 200),
        activation: nn.Module | None = None,
        init: str = "kaiming_normal",
        init_std: float = 0.01,
        norm: str | None = None,
        dropout: float = 0.0,
        output_activation: bool = False,
    ) -> None:
        super().__init__()
        hidden_sizes = list(hidden_sizes)
        if any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden_sizes):
            raise ValueError(f"hidden_sizes={hidden_sizes} must be a list of positive integers ([] for none)")
        if init not in INITS:
            raise ValueError(f"init={init!r} is not one of {list(INITS)}")
        if not isinstance(init_std, (int, float)) or init_std <= 0:
            raise ValueError(f"init_std={init_std!r} must be a positive number")
        if norm is not None and norm not in NORMS:
            raise ValueError(f"norm={norm!r} is not one of {[None, *NORMS]}")
        if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"dropout={dropout!r} must be in [0, 1)")
        activation = activation if activation is not None else nn.ReLU()
        sizes = [in_features, *hidden_sizes, num_classes]
        layers: list[nn.Module] = []
        self.hidden_activations: list[int] = []  # index in self.layers of each hidden layer's activation
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(fan_in, fan_out))
            is_hidden = i < len(hidden_sizes)
            if is_hidden and norm is not None:
                layers.append(NORMS[norm](fan_out))  # normalises each unit (batch) or each sample (layer)
            if is_hidden:
                self.hidden_activations.append(len(layers))
            if is_hidden or output_activation:
                layers.append(copy.deepcopy(activation))
            if is_hidden and dropout > 0:
                layers.append(nn.Dropout(dropout))
        self.layers = nn.Sequential(*layers)
        self.init, self.init_std = init, init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for layer in self.layers:
            if isinstance(layer, tuple(NORMS.values())):
                layer.reset_parameters()  # scale 1, shift 0, and BatchNorm's running statistics forgotten
            if not isinstance(layer, nn.Linear):
                continue
            if self.init == "default":
                layer.reset_parameters()
                continue
            if self.init == "kaiming_normal":
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")  # std = sqrt(2 / fan_in)
            elif self.init == "lecun_normal":
                nn.init.kaiming_normal_(layer.weight, nonlinearity="linear")  # std = 1 / sqrt(fan_in)
            elif self.init == "xavier":
                nn.init.xavier_normal_(layer.weight)  # std = sqrt(2 / (fan_in + fan_out))
            else:
                nn.init.normal_(layer.weight, std=self.init_std)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        # (B, in_features) -> (B, num_classes) logits
        return self.layers(x)

    @property
    def linears(self) -> list[nn.Linear]:
        return [m for m in self.layers if isinstance(m, nn.Linear)]

    @property
    def hidden_layers(self) -> list[tuple[nn.Linear, nn.Module]]:
        """(Linear, activation) of each hidden layer, input side first; the activation's input is the
        Linear's output, after the norm where there is one. Read by mlplab.diagnostics."""
        return list(zip(self.linears, (self.layers[i] for i in self.hidden_activations)))

