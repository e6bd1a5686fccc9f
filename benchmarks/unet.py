"""The reference 2D U-Net the training-feed benchmark trains (torch; on CUDA when present)."""

from __future__ import annotations

from typing import Any


def unet(in_channels: int, classes: int, levels: int = 5, filters: int = 32) -> Any:
    import torch
    from torch import nn

    def block(cin: int, cout: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        )  # fmt: skip

    class UNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            widths = [filters * 2**i for i in range(levels)]
            self.down = nn.ModuleList()
            cin = in_channels
            for w in widths:
                self.down.append(block(cin, w))
                cin = w
            self.up = nn.ModuleList(nn.ConvTranspose2d(w * 2, w, 2, stride=2) for w in widths[:-1])
            self.merge = nn.ModuleList(block(w * 2, w) for w in widths[:-1])
            self.head = nn.Conv2d(widths[0], classes, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            skips = []
            for i, layer in enumerate(self.down):
                x = layer(x)
                if i < len(self.down) - 1:
                    skips.append(x)
                    x = nn.functional.max_pool2d(x, 2)
            for up, merge in zip(reversed(self.up), reversed(self.merge), strict=True):
                x = up(x)
                x = merge(torch.cat([x, skips.pop()], 1))
            return self.head(x)

    return UNet()
