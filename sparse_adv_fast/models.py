"""Model zoo: every model takes inputs in [0, 1] and starts with ``saf.nn.Normalize``.

Layers are plain ``nn.Conv2d`` / ``nn.Linear`` (call ``saf.sparsify`` to mask them). Each
builder has a ``width`` multiplier: every hidden channel / feature count is exactly
``base * width``, so IWI "widen" can build the same family at ``k * width``. A width is a
number in ``(0, MAX_WIDTH]`` (:func:`check_width`): the parameter count grows with its
square, so the bound keeps a typo or a hostile checkpoint from asking for terabytes.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import data
from .nn import Normalize

Stats = Sequence[float] | float | None

# VGG-16 at width 16 already has ~3.7e9 parameters; no experiment of the paper goes past 16.
MAX_WIDTH = 16


def check_width(width: Any) -> float:
    """``width`` itself if it is a usable width multiplier, else a one-line ``ValueError``.

    A width is a real number (not a bool), finite, in ``(0, MAX_WIDTH]``. This is the one
    check for every source of a width: builders, :func:`build`, checkpoints and the CLI.
    Whether ``base * width`` is an integer depends on the model; its builder checks that.
    """
    ok = (isinstance(width, numbers.Real) and not isinstance(width, bool)
          and math.isfinite(width) and 0 < width <= MAX_WIDTH)
    if not ok:
        raise ValueError(f"width must be a number in (0, {MAX_WIDTH}], got {width!r}")
    return width


def _ch(base: int, width: float) -> int:
    """``base * width`` as an exact positive integer."""
    c = base * width
    if not (c > 0 and float(c).is_integer()):
        raise ValueError(
            f"width {width!r} gives a non-integer or non-positive channel count "
            f"{base} * {width} = {c}; use a width for which base * width is a positive int"
        )
    return int(c)


def _check(in_channels: int, num_classes: int, width: float, image_size: int) -> None:
    for name, v in (("in_channels", in_channels), ("num_classes", num_classes),
                    ("image_size", image_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    check_width(width)


def _normalize(in_channels: int, mean: Stats, std: Stats) -> Normalize:
    # Without statistics the layer is the identity, so the model still owns normalisation.
    mean = (0.0,) * in_channels if mean is None else mean
    std = (1.0,) * in_channels if std is None else std
    # Normalize checks std on its values, so its few numbers are always real (CPU) tensors,
    # even when the model's shapes are built on the meta device (modelio does that).
    with torch.device("cpu"):
        return Normalize(mean, std)


def small_cnn(
    in_channels: int = 1, num_classes: int = 10, width: float = 1, image_size: int = 8,
    *, mean: Stats = None, std: Stats = None,
) -> nn.Sequential:
    """conv3x3(16w)-relu-conv3x3(32w)-relu-maxpool2-flatten-linear(64w)-relu-linear.

    Trains to > 90% clean accuracy on ``digits`` in a few seconds on CPU.
    """
    _check(in_channels, num_classes, width, image_size)
    c1, c2, h = _ch(16, width), _ch(32, width), _ch(64, width)
    side = image_size // 2
    if side < 1:
        raise ValueError(f"small_cnn needs image_size >= 2, got {image_size}")
    return nn.Sequential(
        _normalize(in_channels, mean, std),
        nn.Conv2d(in_channels, c1, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * side * side, h),
        nn.ReLU(),
        nn.Linear(h, num_classes),
    )


def mlp(
    in_channels: int = 1, num_classes: int = 10, width: float = 1, image_size: int = 8,
    *, hidden: Sequence[int] = (256, 128), mean: Stats = None, std: Stats = None,
) -> nn.Sequential:
    """flatten-[linear(h*w)-relu]*-linear, with ``hidden`` the base sizes."""
    _check(in_channels, num_classes, width, image_size)
    layers: list[nn.Module] = [_normalize(in_channels, mean, std), nn.Flatten()]
    prev = in_channels * image_size * image_size
    for base in hidden:
        h = _ch(base, width)
        layers += [nn.Linear(prev, h), nn.ReLU()]
        prev = h
    layers.append(nn.Linear(prev, num_classes))
    return nn.Sequential(*layers)


_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    """VGG with BatchNorm, CIFAR-style: conv stages, global pooling, one linear classifier."""

    def __init__(self, cfg: Sequence[int | str], in_channels: int, num_classes: int,
                 width: float, image_size: int, mean: Stats, std: Stats) -> None:
        super().__init__()
        _check(in_channels, num_classes, width, image_size)
        self.normalize = _normalize(in_channels, mean, std)
        layers: list[nn.Module] = []
        prev, side = in_channels, image_size
        for v in cfg:
            if v == "M":
                if side >= 2:  # small inputs (digits 8x8) run out of resolution early
                    layers.append(nn.MaxPool2d(2))
                    side //= 2
                continue
            c = _ch(int(v), width)
            layers += [nn.Conv2d(prev, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                       nn.ReLU()]
            prev = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(prev, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(self.normalize(x))
        return self.classifier(self.pool(x).flatten(1))


def vgg16(
    num_classes: int = 10, width: float = 1, in_channels: int = 3, image_size: int = 32,
    *, mean: Stats = None, std: Stats = None,
) -> VGG:
    """VGG-16 with BatchNorm (13 convs, base widths 64..512 times ``width``)."""
    return VGG(_VGG16, in_channels, num_classes, width, image_size, mean, std)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN, identity or 1x1 conv-BN shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem without max-pool, four stages, global pooling."""

    def __init__(self, blocks: Sequence[int], in_channels: int, num_classes: int,
                 width: float, image_size: int, mean: Stats, std: Stats) -> None:
        super().__init__()
        _check(in_channels, num_classes, width, image_size)
        self.normalize = _normalize(in_channels, mean, std)
        c0 = _ch(64, width)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, c0, 3, 1, 1, bias=False), nn.BatchNorm2d(c0),
            nn.ReLU(),
        )
        stages: list[nn.Module] = []
        prev = c0
        for i, (base, n) in enumerate(zip((64, 128, 256, 512), blocks, strict=True)):
            c = _ch(base, width)
            stage = [BasicBlock(prev, c, 1 if i == 0 else 2)]
            stage += [BasicBlock(c, c, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*stage))
            prev = c
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(prev, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(self.normalize(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.pool(x).flatten(1))


def resnet18(
    num_classes: int = 10, width: float = 1, in_channels: int = 3, image_size: int = 32,
    *, mean: Stats = None, std: Stats = None,
) -> ResNet:
    """ResNet-18, CIFAR-style (3x3 stem, no max-pool), base widths 64..512 times ``width``."""
    return ResNet((2, 2, 2, 2), in_channels, num_classes, width, image_size, mean, std)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": small_cnn, "mlp": mlp, "vgg16": vgg16, "resnet18": resnet18,
}


def check_name(name: Any) -> str:
    """``name`` if it names a model of :data:`MODELS`, else a one-line ``ValueError``."""
    if not isinstance(name, str) or name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {tuple(MODELS)}")
    return name


def build(name: str, dataset: str, width: float = 1) -> nn.Module:
    """Model ``name`` sized for ``dataset`` (channels, image size, classes, mean/std).

    Every argument is checked (:func:`check_name`, ``data.info``, :func:`check_width`)
    before anything is allocated.
    """
    check_name(name)
    check_width(width)
    d = data.info(dataset)
    return MODELS[name](
        in_channels=d["in_channels"], num_classes=d["num_classes"], width=width,
        image_size=d["image_size"], mean=d["mean"], std=d["std"],
    )


__all__ = [
    "MAX_WIDTH", "MODELS", "build", "check_name", "check_width", "mlp", "resnet18",
    "small_cnn", "vgg16",
]
