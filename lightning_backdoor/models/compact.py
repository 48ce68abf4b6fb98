"""CompactNet: a small, fast CNN in the style of Keller Jordan's airbench, the default model for CPU runs."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_backdoor.models.registry import MODELS


class CompactBlock(nn.Module):
    """Two 3x3 convs with a 2x2 max-pool after the first; halves the spatial size.

    Input ``(N, in_width, H, W)``, output ``(N, out_width, H // 2, W // 2)``.
    """

    def __init__(self, in_width: int, out_width: int) -> None:
        super().__init__()
        # Pooling straight after the first conv, before its norm, lets the norm and activation run on a quarter of
        # the pixels; this ordering is what makes the airbench design cheap.
        self.conv1 = nn.Conv2d(in_width, out_width, kernel_size=3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = nn.BatchNorm2d(out_width)
        self.act1 = nn.GELU()
        self.conv2 = nn.Conv2d(out_width, out_width, kernel_size=3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(out_width)
        self.act2 = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(N, in_width, H, W)`` to ``(N, out_width, H // 2, W // 2)``."""
        x = self.act1(self.norm1(self.pool(self.conv1(x))))
        return self.act2(self.norm2(self.conv2(x)))


@MODELS.register("compact")
class CompactNet(nn.Module):
    """An airbench-style CNN: a 2x2 stem, three conv-pool blocks, global max-pool and a bias-free linear head.

    Takes ``(N, in_channels, H, W)`` floats in [0, 1] with ``H, W >= 9`` (e.g. 28x28 MNIST, 32x32 CIFAR) and returns
    logits ``(N, num_classes)``. Layers have stable names (``stem.conv``, ``blocks.2.conv2``, ``head``) so that
    defenses and configs can address them.

    Args:
        num_classes: number of output classes.
        in_channels: channels of the input images (1 for MNIST, 3 for CIFAR).
        widths: output channels of the three blocks.
        stem_width: output channels of the stem conv.
        logit_scale: fixed factor on the logits; a value below 1 keeps the initial predictions near uniform.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        widths: tuple[int, int, int] = (64, 256, 256),
        stem_width: int = 24,
        logit_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if len(widths) != 3:
            raise ValueError(f"widths must have 3 entries, got {widths!r}")
        self.num_classes = num_classes
        self.logit_scale = logit_scale
        # A 2x2 unpadded stem (airbench's patch-whitening shape) sees every pixel once per output and trims
        # 32 -> 31 / 28 -> 27, so the three halvings end at 3x3 for both data sets.
        self.stem = nn.Sequential()
        self.stem.add_module("conv", nn.Conv2d(in_channels, stem_width, kernel_size=2, padding=0, bias=False))
        self.stem.add_module("norm", nn.BatchNorm2d(stem_width))
        self.stem.add_module("act", nn.GELU())
        block_inputs = (stem_width, *widths[:-1])
        self.blocks = nn.Sequential(*(CompactBlock(w_in, w_out) for w_in, w_out in zip(block_inputs, widths)))
        # Max rather than mean over the final map: a localised trigger feature survives pooling undiluted.
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(widths[-1], num_classes, bias=False)

    def forward(self, images: Tensor) -> Tensor:
        """Map images ``(N, in_channels, H, W)`` in [0, 1] to logits ``(N, num_classes)``."""
        features = self.flatten(self.pool(self.blocks(self.stem(images))))
        return self.head(features) * self.logit_scale
