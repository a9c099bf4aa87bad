"""The CNN width family: ``depth`` convolutions with ``width`` channels and a Linear head."""

from __future__ import annotations

from functools import partial
from typing import Unpack

import torch
from torch import nn
from torch.nn.utils import skip_init

from ntklens.errors import NtkLensError
from ntklens.models.width_model import FamilyArguments, WidthModel, positive_int

POOLINGS = {"none": None, "avg": nn.AvgPool2d, "max": nn.MaxPool2d}


class ConvNet(WidthModel):
    """Convolutions on images of shape ``in_shape = (C, H, W)``, then a Linear readout.

    Each block is ``conv → φ → pool``: a stride-1 ``kernel_size``² convolution to ``width``
    channels with zero ``padding``, the activation and, if ``pooling`` is "avg" or "max",
    a 2×2 pooling of stride 2. The feature map is flattened into an ``nn.Linear`` head.
    Each conv and the head compute ``h = m_w · W * x + m_b · b`` with the multipliers of
    the parameterization; the fan-in of a conv is ``C_in · kernel_size²`` and that of the
    head ``width · H' · W'``.
    """

    family = "cnn"

    def __init__(
        self,
        *,
        kernel_size: int = 3,
        padding: int = 1,
        pooling: str = "none",
        **arguments: Unpack[FamilyArguments],
    ) -> None:
        super().__init__(**arguments)
        in_shape, n_outputs = self.in_shape, self.n_outputs
        if len(in_shape) != 3:
            raise NtkLensError(f"in_shape must be (C, H, W) for a cnn, got {tuple(in_shape)}")
        channels, height, breadth = (positive_int("in_shape entry", s) for s in in_shape)
        kernel_size = positive_int("kernel_size", kernel_size)
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise NtkLensError(f"padding must be an integer >= 0, got {padding!r}")
        if pooling not in POOLINGS:
            raise NtkLensError(f"unknown pooling {pooling!r}; choose one of none, avg, max")
        self.kernel_size, self.padding, self.pooling = kernel_size, padding, pooling
        pool = POOLINGS[pooling]
        generator = torch.Generator().manual_seed(self.seed)
        for index in range(self.depth):
            c_in = channels if index == 0 else self.width
            height, breadth = (s + 2 * padding - kernel_size + 1 for s in (height, breadth))
            if pool is not None:
                height, breadth = height // 2, breadth // 2
            if min(height, breadth) < 1:
                raise NtkLensError(
                    f"in_shape {tuple(in_shape)} is too small for {self.depth} conv blocks "
                    f"(kernel_size={kernel_size}, padding={padding}, pooling={pooling}); "
                    "lower depth, raise padding or turn off pooling"
                )
            self._append_layer(
                partial(skip_init, nn.Conv2d, c_in, self.width, kernel_size, padding=padding),
                kind="input" if index == 0 else "hidden",
                fan_in=c_in * kernel_size**2,
                width_in=1 if index == 0 else self.width,
                generator=generator,
            )
            self.net.append(self._new_activation())
            if pool is not None:
                self.net.append(pool(2))
        self.net.append(nn.Flatten())
        head_in = self.width * height * breadth
        self._append_layer(
            partial(skip_init, nn.Linear, head_in, n_outputs),
            kind="output",
            fan_in=head_in,
            width_in=self.width,
            generator=generator,
        )
