"""A small ResNet with BatchNorm, built from ntklens.models.layers: your own model in a sweep.

``resnet`` is a model factory: ntklens calls it as
``resnet(width=..., parameterization=..., n_classes=..., input_shape=..., **options)`` for
every run of ``examples/own_model_sweep.toml``. Because every convolution and the readout
are :mod:`ntklens.models.layers` blocks, the same code is a standard, NTK- or
μP-parameterized network; the per-layer learning rates come with the blocks.

    ntklens plan examples/own_model_sweep.toml
    ntklens sweep examples/own_model_sweep.toml --store results/own-resnet
    ntklens report results/own-resnet
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ntklens.models import layers


def _norm(norm: str, width: int, parameterization: str) -> nn.Module:
    """BatchNorm ("batch") or none ("none", to see what the normalization changes)."""
    if norm == "batch":
        return layers.BatchNorm2d(width, width=width, parameterization=parameterization)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'batch' or 'none', got {norm!r}")


class BasicBlock(nn.Module):
    """``relu(x + bn(conv(relu(bn(conv(x))))))`` at a constant number of channels."""

    def __init__(self, width: int, parameterization: str, norm: str = "batch") -> None:
        super().__init__()
        p = {"width": width, "parameterization": parameterization}
        # no conv biases: the BatchNorm shift that follows makes them redundant
        self.conv1 = layers.Conv2d(width, width, 3, padding=1, bias_std=0.0, **p)
        self.norm1 = _norm(norm, width, parameterization)
        self.conv2 = layers.Conv2d(width, width, 3, padding=1, bias_std=0.0, **p)
        self.norm2 = _norm(norm, width, parameterization)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(x + self.norm2(self.conv2(h)))


class ResNet(nn.Module):
    """Stem convolution, ``blocks`` residual blocks of ``width`` channels, global average
    pooling and a readout to ``n_classes`` logits; inputs ``(B, C, H, W)``."""

    def __init__(
        self,
        width: int,
        parameterization: str,
        n_classes: int,
        input_shape: Sequence[int],
        blocks: int = 2,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"resnet needs images (C, H, W), got input_shape={input_shape}")
        p = {"width": width, "parameterization": parameterization}
        self.stem = layers.Conv2d(
            input_shape[0], width, 3, padding=1, kind="input", bias_std=0.0, **p
        )
        self.stem_norm = _norm(norm, width, parameterization)
        self.blocks = nn.Sequential(
            *[BasicBlock(width, parameterization, norm) for _ in range(blocks)]
        )
        self.head = layers.readout(width, n_classes, **p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem_norm(self.stem(x)))
        h = self.blocks(h).mean(dim=(2, 3))
        return self.head(h)


def resnet(
    width: int,
    parameterization: str,
    n_classes: int,
    input_shape: Sequence[int],
    blocks: int = 2,
    norm: str = "batch",
) -> ResNet:
    """The factory of the sweep: one ResNet per (width, parameterization); ``blocks``
    residual blocks, ``norm`` "batch" (BatchNorm) or "none"."""
    return ResNet(width, parameterization, n_classes, input_shape, blocks, norm)
