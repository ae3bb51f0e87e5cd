"""Plain nn.Modules: the MLP, and softmax regression as an MLP with no hidden layer."""

from __future__ import annotations

import copy

from torch import Tensor, nn

INITS = ("kaiming_normal", "xavier", "normal", "default")


class MLP(nn.Module):
    """Linear layers with an activation between them; linear logits unless asked otherwise.

    Args:
        in_features: inputs per sample (784 for 28x28 images); filled in from the dataset.
        num_classes: logits per sample; filled in from the dataset.
        hidden_sizes: width of each hidden layer; [] gives softmax regression (one Linear).
        activation: module applied after each hidden layer (copied per layer).
        init: "kaiming_normal" (fan-in, ReLU gain), "xavier" (normal), "normal" (std=init_std),
            or "default" (PyTorch's own Linear init). Biases start at zero except for "default".
        init_std: the standard deviation for init="normal".
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
        if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"dropout={dropout!r} must be in [0, 1)")
        activation = activation if activation is not None else nn.ReLU()
        sizes = [in_features, *hidden_sizes, num_classes]
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(fan_in, fan_out))
            is_hidden = i < len(hidden_sizes)
            if is_hidden or output_activation:
                layers.append(copy.deepcopy(activation))
            if is_hidden and dropout > 0:
                layers.append(nn.Dropout(dropout))
        self.layers = nn.Sequential(*layers)
        self.init, self.init_std = init, init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for layer in self.layers:
            if not isinstance(layer, nn.Linear):
                continue
            if self.init == "default":
                layer.reset_parameters()
                continue
            if self.init == "kaiming_normal":
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")  # std = sqrt(2 / fan_in)
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

