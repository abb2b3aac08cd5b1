"""Image classifiers for the layer-level learning-rate experiments.

Every model takes ``(in_channels, image_size, num_classes, **options)`` and maps
``[N, in_channels, image_size, image_size]`` to logits ``[N, num_classes]``.
Convolutional models end in a global pool, so any square image of at least 8x8
works (sklearn digits is 1x8x8, CIFAR is 3x32x32).

Models are plain ``nn.Module`` trees of ``nn.Conv2d`` / ``nn.Linear`` /
``nn.BatchNorm2d`` leaves. Layer discovery elsewhere traces forward hooks and
attaches each BatchNorm to the conv that ran just before it, so forward always
runs conv then its BN, and a ResNet block runs its shortcut conv + BN after the
residual branch.

    model = build_model("resnet", in_channels=3, image_size=32, num_classes=10, depth=56)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from meta_llr.errors import UserError
from meta_llr.options import check_section, fail, opt
from meta_llr.registry import config_from_signature, store, typed

MODELS: dict[str, Callable[..., nn.Module]] = {}
MODEL_CONFIGS: dict[str, type] = {}

MIN_IMAGE_SIZE = 8


def register_model(name: str, config: type | None = None):
    """Class decorator: make a model available as ``model=name``. ``config``: its options as a
    dataclass (default: derived from ``__init__`` after the three size arguments)."""

    def deco(cls):
        if name in MODELS and MODELS[name].__qualname__ != cls.__qualname__:
            raise ValueError(f"model {name!r} registered twice")
        MODELS[name] = cls
        MODEL_CONFIGS[name] = store("model", name, config or config_from_signature(cls, name, skip=3))
        return cls

    return deco


# One dataclass per built-in model: its options, defaults and ranges (``model.NAME=...``).
@dataclass
class ModelConfig:
    section: ClassVar[str] = "model"
    name: str = opt("shallow", free=True)


@dataclass
class MLPConfig(ModelConfig):
    name: str = opt("mlp", free=True)
    hidden: int = opt(256, ge=1, doc="width of every hidden layer")
    depth: int = opt(2, ge=0, doc="hidden layers (0: a linear classifier)")


@dataclass
class ShallowConfig(ModelConfig):
    name: str = opt("shallow", free=True)
    width: int = opt(32, ge=1, doc="channels of the first conv (then 2w, 4w)")


@dataclass
class PlainConfig(ModelConfig):
    name: str = opt("plain", free=True)
    depth: int = opt(11, ge=4, doc="weighted layers: one conv per stage at least, plus the head")
    width: int = opt(16, ge=1, doc="channels of the first stage")


@dataclass
class ResNetConfig(ModelConfig):
    name: str = opt("resnet", free=True)
    depth: int = opt(20, ge=8, doc="6n+2: 20, 32, 44, 56, 110")
    width: int = opt(16, ge=1, doc="channels of the first stage (then 2w, 4w)")
    shortcut: str = opt("conv", choices=("conv", "pad"), doc="conv: 1x1 projection; pad: option A")

    def validate(self):
        if (self.depth - 2) % 6:
            fail("model.depth", self.depth, "6n+2, e.g. 20, 32, 44, 56 or 110")


@dataclass
class ResNet18Config(ModelConfig):
    name: str = opt("resnet18", free=True)
    width: int = opt(64, ge=1, doc="channels of the first stage (then 2w, 4w, 8w)")


@dataclass
class FastNetConfig(ModelConfig):
    name: str = opt("fastnet", free=True)
    widths: list[int] = opt([64, 256, 256], ge=1, length=(1, None), doc="channels of each conv group")
    whiten: bool = opt(False, free=True, doc="airbench's stem: frozen patch-whitening filters from the training images "
                                             "and a bias trained for the first 3 epochs, no BatchNorm")


def build_model(name: str, in_channels: int, image_size: int, num_classes: int, **options) -> nn.Module:
    """Build model ``name``; bad names and options raise a one-line ``UserError``."""
    from meta_llr.registry import load_all

    load_all()
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; valid: {', '.join(sorted(MODELS))}")
    for arg, value, low in (("in_channels", in_channels, 1), ("image_size", image_size, MIN_IMAGE_SIZE),
                            ("num_classes", num_classes, 1)):
        if not (isinstance(value, int) and not isinstance(value, bool)) or value < low:
            raise UserError(f"model {name}: {arg}={value!r} is invalid; it must be an integer >= {low}")
    schema = MODEL_CONFIGS[name]
    values = typed(schema, {"name": name, **options}, prefix="model")
    check_section(schema(**values), schema, "model")
    values.pop("name")
    try:
        return MODELS[name](in_channels, image_size, num_classes, **values)
    except ValueError as error:  # plugin models check their own options with ValueError
        raise UserError(f"model={name}: {error}") from None


def _kaiming_init(model: nn.Module):
    """He et al. 2015 normal init for every conv (fan-in, ReLU gain); BN starts at identity."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")


def _pool2(x: torch.Tensor, pool: Callable = F.max_pool2d) -> torch.Tensor:
    """2x2 max-pool, skipped once the feature map is already 1x1."""
    return pool(x, 2) if min(x.shape[-2:]) > 1 else x


class ConvBN(nn.Module):
    """conv(k x k, no bias) -> BatchNorm -> ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, kernel_size: int = 3, relu: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.relu = relu

    def forward(self, x):
        x = self.bn(self.conv(x))
        return F.relu(x) if self.relu else x


# --------------------------------------------------------------------------- MLP


@register_model("mlp", MLPConfig)
class MLP(nn.Module):
    """Multilayer perceptron: flatten, ``depth`` x (Linear + ReLU) of width ``hidden``, linear head.

    The classic fully connected baseline (e.g. LeCun et al. 1998, "Gradient-based
    learning applied to document recognition").
    """

    def __init__(self, in_channels: int, image_size: int, num_classes: int, hidden: int = 256, depth: int = 2):
        super().__init__()
        dims = [in_channels * image_size * image_size] + [hidden] * depth
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x):
        x = x.flatten(1)
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.head(x)


# ----------------------------------------------------------------------- shallow


@register_model("shallow", ShallowConfig)
class Shallow(nn.Module):
    """The research discussion's "shallow network": three conv3x3-BN-ReLU layers.

    Channels width, 2*width, 4*width; 2x2 max-pool after conv 2 and conv 3 (skipped
    at 1x1), global average pool, linear head.
    """

    def __init__(self, in_channels: int, image_size: int, num_classes: int, width: int = 32):
        super().__init__()
        self.conv1 = ConvBN(in_channels, width)
        self.conv2 = ConvBN(width, 2 * width)
        self.conv3 = ConvBN(2 * width, 4 * width)
        self.head = nn.Linear(4 * width, num_classes)
        _kaiming_init(self)

    def forward(self, x):
        x = self.conv1(x)
        x = _pool2(self.conv2(x))
        x = _pool2(self.conv3(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


# ------------------------------------------------------------------------- plain


@register_model("plain", PlainConfig)
class Plain(nn.Module):
    """VGG-style deep net without skip connections: the "plain" baseline of He et al. 2016
    (arXiv 1512.03385, section 4.2), after Simonyan & Zisserman 2014 (arXiv 1409.1556).

    ``depth - 1`` conv3x3-BN-ReLU layers split as evenly as possible over 3 stages
    (earlier stages take the remainder) of widths w, 2w, 4w; the first conv of
    stages 2 and 3 has stride 2. Global average pool, linear head (the last layer).
    """

    def __init__(self, in_channels: int, image_size: int, num_classes: int, depth: int = 11, width: int = 16):
        super().__init__()
        n_conv = depth - 1
        per_stage = [n_conv // 3 + (i < n_conv % 3) for i in range(3)]
        layers, c_in = [], in_channels
        for stage, n in enumerate(per_stage):
            c_out = width * 2**stage
            for i in range(n):
                layers.append(ConvBN(c_in, c_out, stride=2 if stage > 0 and i == 0 else 1))
                c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)
        _kaiming_init(self)

    def forward(self, x):
        x = self.layers(x)
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


# ------------------------------------------------------------------------ resnet


class BasicBlock(nn.Module):
    """Two conv3x3-BN layers plus a shortcut, ReLU after the sum (He et al. 2016, fig. 2).

    shortcut "conv": 1x1 conv + BN projection when the shape changes (option B);
    "pad": strided identity with zero-padded extra channels (option A, no params).
    The projection runs after the residual branch so forward order matches depth.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, shortcut: str = "conv"):
        super().__init__()
        self.conv1 = ConvBN(c_in, c_out, stride)
        self.conv2 = ConvBN(c_out, c_out, relu=False)
        self.stride, self.extra = stride, c_out - c_in
        self.proj = None
        if shortcut == "conv" and (stride != 1 or c_in != c_out):
            self.proj = ConvBN(c_in, c_out, stride, kernel_size=1, relu=False)

    def forward(self, x):
        out = self.conv2(self.conv1(x))
        if self.proj is not None:
            x = self.proj(x)
        else:
            if self.stride != 1:
                x = x[:, :, :: self.stride, :: self.stride]
            if self.extra:
                x = F.pad(x, (0, 0, 0, 0, 0, self.extra))  # zero channels appended
        return F.relu(out + x)


class _ResNetBody(nn.Module):
    """Stem conv-BN-ReLU, stages of basic blocks, global average pool, linear head."""

    def __init__(self, in_channels, num_classes, stem_width, widths, blocks, strides, shortcut):
        super().__init__()
        self.stem = ConvBN(in_channels, stem_width)
        layers, c_in = [], stem_width
        for c_out, n, stride in zip(widths, blocks, strides):
            for i in range(n):
                layers.append(BasicBlock(c_in, c_out, stride if i == 0 else 1, shortcut))
                c_in = c_out
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)
        _kaiming_init(self)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


@register_model("resnet", ResNetConfig)
class ResNet(_ResNetBody):
    """CIFAR ResNet of He et al. 2016, "Deep Residual Learning for Image Recognition"
    (arXiv 1512.03385, section 4.2): depth = 6n+2, a 3x3 conv stem, 3 stages of n
    basic blocks (widths w, 2w, 4w, stride 2 at the start of stages 2 and 3), global
    average pool, linear head. ResNet-20/32/44/56/110 via ``depth``.
    """

    def __init__(self, in_channels: int, image_size: int, num_classes: int, depth: int = 20, width: int = 16,
                 shortcut: str = "conv"):
        n = (depth - 2) // 6
        w = width
        super().__init__(in_channels, num_classes, w, [w, 2 * w, 4 * w], [n] * 3, [1, 2, 2], shortcut)


@register_model("resnet18", ResNet18Config)
class ResNet18(_ResNetBody):
    """ResNet-18 (He et al. 2016, arXiv 1512.03385, table 1: basic blocks 2,2,2,2 with
    widths w, 2w, 4w, 8w) with the usual CIFAR stem: a 3x3 stride-1 conv and no
    max-pool. 1x1 conv + BN projection shortcuts where the shape changes.
    """

    def __init__(self, in_channels: int, image_size: int, num_classes: int, width: int = 64):
        w = width
        super().__init__(in_channels, num_classes, w, [w, 2 * w, 4 * w, 8 * w], [2] * 4, [1, 2, 2, 2], "conv")


# ----------------------------------------------------------------------- fastnet


class FastBN(nn.BatchNorm2d):
    """BatchNorm with gamma frozen at 1 and only beta learned (airbench94). Its running statistics
    keep 0.6 of their value at each batch: airbench's momentum 0.6, torch's ``momentum=0.4``."""

    def __init__(self, num_features: int):
        super().__init__(num_features, eps=1e-12, momentum=0.4)
        self.weight.requires_grad_(False)


class ConvGroup(nn.Module):
    """conv3x3 -> maxpool2 -> BN -> GELU -> conv3x3 -> BN -> GELU (pool skipped at 1x1)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn1 = FastBN(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = FastBN(c_out)

    def forward(self, x):
        x = F.gelu(self.bn1(_pool2(self.conv1(x))))
        return F.gelu(self.bn2(self.conv2(x)))


@register_model("fastnet", FastNetConfig)
class FastNet(nn.Module):
    """airbench94-like net, from K. Jordan, "94% on CIFAR-10 in 3.29 Seconds on a Single
    GPU" (arXiv 2404.00498): a 2x2 unpadded stem conv to 24 channels + BN + GELU, one
    conv group per entry of ``widths``, global max pool, bias-free linear head scaled
    by a fixed 1/9. Convs are bias-free and identity-initialised on their first
    ``in_channels`` filters (the paper's partial identity init); BN keeps 0.6 of its running
    statistics per batch, has eps 1e-12 and a frozen gamma of 1. The stem is an ordinary learned
    conv + BN, unless ``whiten=True``: then it is the paper's, a conv with a bias and no BN, whose
    filters :meth:`init_from_data` (called by the run with 5,000 evenly spaced training images)
    sets to the data-dependent whitening filters and freezes, and whose bias :meth:`epoch_start`
    trains for the first ``whiten_bias_epochs`` epochs only.
    """

    stem_width = 24
    head_scale = 1 / 9
    whiten_images = 5000  # training images the whitening statistics are taken from
    whiten_bias_epochs = 3

    def __init__(self, in_channels: int, image_size: int, num_classes: int, widths: tuple = (64, 256, 256),
                 whiten: bool = False):
        super().__init__()
        if whiten and 2 * in_channels * 4 != self.stem_width:
            raise UserError(f"model.whiten=true needs 3-channel images (2 x 3 x 2 x 2 = {self.stem_width} whitening "
                            f"filters), the data has {in_channels}; use model.whiten=false")
        self.whiten = whiten
        self.stem = nn.Conv2d(in_channels, self.stem_width, 2, padding=0, bias=whiten)
        self.stem_bn = nn.Identity() if whiten else FastBN(self.stem_width)
        if whiten:
            nn.init.zeros_(self.stem.bias)
        c_in, groups = self.stem_width, []
        for c_out in widths:
            groups.append(ConvGroup(c_in, c_out))
            c_in = c_out
        self.groups = nn.Sequential(*groups)
        self.head = nn.Linear(c_in, num_classes, bias=False)
        for group in self.groups:
            for conv in (group.conv1, group.conv2):
                with torch.no_grad():
                    nn.init.dirac_(conv.weight[: conv.in_channels])

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor) -> None:
        """``whiten``: the stem becomes the whitening transform of the images' 2x2 patches, frozen.
        With ``Σ = V diag(λ) Vᵀ`` the covariance of the flattened patches of ``x`` (normalised
        training images), the filters are ``±v_i / sqrt(λ_i + 5e-4)``, each eigenvector with both
        signs (the GELU after the stem keeps one side): a patch's whitened coordinates. Keller
        Jordan's airbench (arXiv 2404.00498, section 3) initialises its first layer this way."""
        if not self.whiten:
            return
        patches = F.unfold(x.float(), kernel_size=2).transpose(1, 2).reshape(-1, self.stem.weight[0].numel())
        patches = patches - patches.mean(0)
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance.double())
        filters = (eigenvectors.T / (eigenvalues + 5e-4).sqrt()[:, None]).float()
        filters = filters.flip(0).reshape(-1, *self.stem.weight.shape[1:])  # largest eigenvalue first
        self.stem.weight.copy_(torch.cat([filters, -filters]))
        self.stem.weight.requires_grad_(False)

    def epoch_start(self, epoch: int) -> None:
        """Called by the run before each epoch (``epoch`` counts from 0, a resume included):
        ``whiten``'s stem bias learns for the first ``whiten_bias_epochs`` epochs, then is frozen."""
        if self.whiten:
            self.stem.bias.requires_grad_(epoch < self.whiten_bias_epochs)

    def forward(self, x):
        x = F.gelu(self.stem_bn(self.stem(x)))
        x = self.groups(x)
        x = F.adaptive_max_pool2d(x, 1).flatten(1)
        return self.head(x) * self.head_scale
