"""The U-Net of both studies, configurable.

Study a used a standard 4-level U-Net (two 3x3 conv + BN + ReLU per block, max-pool down,
transposed-conv up); study b a deeper one with BN after every conv. Both are this class with
different ``depth``/``base`` settings. ``forward`` returns *logits*: losses are computed on
logits for numerical stability, and :meth:`UNet.probabilities` applies the sigmoid.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["UNetConfig", "UNet"]


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of a :class:`UNet`; stored in checkpoints so a model can be rebuilt.

    Parameters
    ----------
    in_channels
        Number of input channels (the length of the channel set).
    depth
        Number of down-sampling levels (4 in study a). Inputs are padded to a multiple of
        ``2**depth`` by the inference code.
    base
        Feature maps of the first level; doubled at each level down.
    batch_norm
        BatchNorm after each convolution (both studies).
    dropout
        Dropout probability in the bottleneck (0 = none). Also enables MC-dropout at inference.
    """

    in_channels: int
    depth: int = 4
    base: int = 32
    batch_norm: bool = True
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {self.in_channels}")
        if not 1 <= self.depth <= 6:
            raise ValueError(f"depth must be 1-6, got {self.depth}")
        if self.base < 1:
            raise ValueError(f"base must be >= 1, got {self.base}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def multiple(self) -> int:
        """Spatial sizes must be multiples of this."""
        return int(2**self.depth)

    @property
    def receptive_field(self) -> int:
        """Receptive field in pixels of one output pixel (for choosing inference halos).

        Each level adds two 3x3 convolutions at its resolution, on the way down and up.
        """
        # Each 3x3 conv at level l (stride 2**l) widens the field by 2 * 2**l; each 2x2
        # max-pool or transposed conv by 2**l. Two convs per block, down, bottleneck and up.
        rf = 1
        for level in range(self.depth + 1):
            rf += 2 * 2 * 2**level
        for level in range(self.depth):
            rf += 2 * 2 * 2**level + 2 * 2**level
        return rf


def _block(cin: int, cout: int, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c_in in (cin, cout):
        layers.append(nn.Conv2d(c_in, cout, 3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(cout))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class UNet(nn.Module):
    """U-Net for binary segmentation: (N, C, H, W) -> logits (N, 1, H, W)."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        widths = [config.base * 2**i for i in range(config.depth + 1)]
        self.down = nn.ModuleList()
        cin = config.in_channels
        for w in widths[:-1]:
            self.down.append(_block(cin, w, config.batch_norm))
            cin = w
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = _block(widths[-2], widths[-1], config.batch_norm)
        self.dropout = nn.Dropout2d(config.dropout) if config.dropout > 0 else nn.Identity()
        self.up = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for w_low, w in zip(reversed(widths[1:]), reversed(widths[:-1])):
            self.up.append(nn.ConvTranspose2d(w_low, w, 2, stride=2))
            self.up_blocks.append(_block(2 * w, w, config.batch_norm))
        self.head = nn.Conv2d(widths[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.config.multiple
        if x.shape[-1] % m or x.shape[-2] % m:
            raise ValueError(f"input height/width must be multiples of {m}, got {tuple(x.shape[-2:])}")
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.dropout(self.bottleneck(x))
        for up, block, skip in zip(self.up, self.up_blocks, reversed(skips)):
            x = block(torch.cat([up(x), skip], dim=1))
        out: torch.Tensor = self.head(x)
        return out

    @torch.no_grad()
    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Ice probability in [0, 1], (N, 1, H, W)."""
        return torch.sigmoid(self.forward(x))
