"""The built-in MLP (activation, dropout, batch norm, initialisation) and SyncBatchNorm conversion."""
from __future__ import annotations

from torch import nn

from .config import ModelConfig

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


def mlp(in_features: int, out_features: int, cfg: ModelConfig) -> nn.Sequential:
    """Linear -> [BatchNorm] -> activation -> [Dropout] per hidden width, then a linear head."""
    layers: list[nn.Module] = []
    width = in_features
    for hidden in cfg.hidden:
        layers.append(nn.Linear(width, hidden, bias=not cfg.batch_norm))
        if cfg.batch_norm:
            layers.append(nn.BatchNorm1d(hidden))
        layers.append(ACTIVATIONS[cfg.activation]())
        if cfg.dropout > 0:
            layers.append(nn.Dropout(cfg.dropout))
        width = hidden
    layers.append(nn.Linear(width, out_features))
    model = nn.Sequential(*layers)
    initialise(model, cfg.init, cfg.activation)
    return model


def initialise(model: nn.Module, scheme: str, activation: str = "relu") -> None:
    """Re-initialise the weights of every Linear layer: kaiming (He), xavier (Glorot), or torch's default."""
    if scheme == "default":
        return
    gain_name = "relu" if activation in ("relu", "gelu") else activation
    for m in model.modules():
        if isinstance(m, nn.Linear):
            if scheme == "kaiming":
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu" if gain_name == "relu" else "linear")
            else:
                nn.init.xavier_uniform_(m.weight, gain=nn.init.calculate_gain(gain_name))
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Every BatchNorm*d becomes SyncBatchNorm: statistics over the global batch, not each rank's shard."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)
