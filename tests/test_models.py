"""Known-answer tests for meta_llr.models: shapes, exact parameter counts, gradients, errors."""

from pathlib import Path

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from meta_llr.errors import UserError
from meta_llr.models import MODEL_CONFIGS, MODELS, BasicBlock, build_model

NAMES = ["fastnet", "mlp", "plain", "resnet", "resnet18", "shallow"]
SMALL = {"fastnet": {"widths": [8, 16, 16]}, "mlp": {"hidden": 16}, "plain": {"width": 4},
         "resnet": {"width": 4}, "resnet18": {"width": 4}, "shallow": {"width": 4}}


def n_params(model, trainable_only=False):
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def test_registry_names():
    assert sorted(MODELS) == NAMES


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape,classes", [((2, 1, 8, 8), 10), ((2, 3, 32, 32), 100), ((3, 2, 9, 9), 7)])
def test_output_shape(name, shape, classes):
    torch.manual_seed(0)
    model = build_model(name, shape[1], shape[2], classes)
    out = model(torch.randn(shape))
    assert out.shape == (shape[0], classes)
    assert torch.isfinite(out).all()


def conv_bn(c_in, c_out, k=3):
    return c_in * c_out * k * k + 2 * c_out  # bias-free conv + BN gamma, beta


def cifar_resnet_count(n, w, classes, in_ch=3, projection=True):
    """He et al. 2016 sec. 4.2: stem, 3 stages of n blocks (w, 2w, 4w), linear head."""
    total = conv_bn(in_ch, w)
    c_in = w
    for c in (w, 2 * w, 4 * w):
        for i in range(n):
            total += conv_bn(c_in, c) + conv_bn(c, c)
            if projection and c_in != c:
                total += conv_bn(c_in, c, k=1)
            c_in = c
    return total + 4 * w * classes + classes


def test_resnet20_param_counts():
    conv = build_model("resnet", 3, 32, 10)
    pad = build_model("resnet", 3, 32, 10, shortcut="pad")
    assert n_params(conv) == cifar_resnet_count(3, 16, 10) == 272_474
    # option A has no shortcut params: the paper's "0.27M" ResNet-20
    assert n_params(pad) == cifar_resnet_count(3, 16, 10, projection=False) == 269_722
    assert n_params(build_model("resnet", 1, 8, 7, width=8)) == cifar_resnet_count(3, 8, 7, in_ch=1)


def test_resnet56_blocks_per_stage():
    model = build_model("resnet", 3, 32, 10, depth=56)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    widths = [b.conv2.conv.out_channels for b in blocks]
    assert widths == [16] * 9 + [32] * 9 + [64] * 9
    assert n_params(model) == cifar_resnet_count(9, 16, 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) + 1 == 56  # 6n+1 convs plus the linear head


def test_resnet18_param_count():
    # the well-known CIFAR ResNet-18 count (3x3 stem, projection shortcuts)
    assert n_params(build_model("resnet18", 3, 32, 10)) == 11_173_962


def test_other_param_counts():
    assert n_params(build_model("mlp", 1, 8, 10)) == 64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10
    assert n_params(build_model("mlp", 1, 8, 10, depth=0)) == 64 * 10 + 10
    w = 32
    shallow = conv_bn(3, w) + conv_bn(w, 2 * w) + conv_bn(2 * w, 4 * w) + 4 * w * 10 + 10
    assert n_params(build_model("shallow", 3, 32, 10)) == shallow
    # plain depth 11: 10 convs split 4/3/3 over widths 16/32/64
    plain = conv_bn(3, 16) + 3 * conv_bn(16, 16) + conv_bn(16, 32) + 2 * conv_bn(32, 32) \
        + conv_bn(32, 64) + 2 * conv_bn(64, 64) + 64 * 10 + 10
    assert n_params(build_model("plain", 3, 32, 10)) == plain
    convs = [m for m in build_model("plain", 3, 32, 10, depth=20).modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 19


def test_fastnet_structure():
    model = build_model("fastnet", 3, 32, 10)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 7
    for bn in bns:
        assert not bn.weight.requires_grad and torch.all(bn.weight == 1)
        assert bn.bias.requires_grad
        assert bn.momentum == 0.4 and bn.eps == 1e-12
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.bias is None for c in convs)
    assert convs[0].kernel_size == (2, 2) and convs[0].padding == (0, 0) and convs[0].out_channels == 24
    assert [c.out_channels for c in convs[1:]] == [64, 64, 256, 256, 256, 256]
    assert model.head.bias is None
    conv_w = 3 * 24 * 4 + 24 * 64 * 9 + 64 * 64 * 9 + 64 * 256 * 9 + 3 * 256 * 256 * 9
    frozen = 24 + 2 * 64 + 4 * 256
    assert n_params(model, trainable_only=True) == conv_w + frozen + 256 * 10
    assert n_params(model) == conv_w + 2 * frozen + 256 * 10
    # the head's output is scaled by a fixed 1/9
    seen = {}
    model.head.register_forward_hook(lambda m, i, o: seen.update(out=o))
    out = model(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(out, seen["out"] / 9)


@pytest.mark.parametrize("name,options", [(n, {}) for n in NAMES] + [
    ("resnet", {"shortcut": "pad"}), ("plain", {"depth": 4}), ("mlp", {"depth": 0})])
def test_every_param_gets_a_gradient(name, options):
    torch.manual_seed(0)
    model = build_model(name, 1, 8, 10, **{**SMALL[name], **options})
    model(torch.randn(4, 1, 8, 8)).logsumexp(1).sum().backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, pname
        else:
            assert p.grad is None, pname


@pytest.mark.parametrize("name", NAMES)
def test_each_bn_follows_its_conv(name):
    """Trace layers as the controller does: each BN runs right after a conv of its width."""
    model = build_model(name, 3, 16, 10, **SMALL[name])
    order = []
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) or (getattr(m, "weight", None) is not None and m.weight.dim() >= 2):
            m.register_forward_hook(lambda mod, i, o: order.append(mod))
    model(torch.randn(2, 3, 16, 16))
    assert len(order) == len(set(order)) == sum(1 for _ in model.modules() if _ in order)
    for prev, m in zip(order, order[1:]):
        if isinstance(m, nn.BatchNorm2d):
            assert isinstance(prev, nn.Conv2d) and prev.out_channels == m.num_features
    assert isinstance(order[-1], nn.Linear)


def test_resnet_projection_runs_after_residual_branch():
    block = build_model("resnet", 3, 16, 10, width=4).blocks[3]  # first block of stage 2
    order = []
    for m in block.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(lambda mod, i, o: order.append(mod))
    block(torch.randn(2, 4, 8, 8))
    assert order == [block.conv1.conv, block.conv2.conv, block.proj.conv]


@pytest.mark.parametrize("name", NAMES)
def test_channels_last_and_bf16_autocast(name):
    torch.manual_seed(0)
    model = build_model(name, 3, 16, 10, **SMALL[name])
    x = torch.randn(2, 3, 16, 16)
    ref = model(x)
    model = model.to(memory_format=torch.channels_last)
    torch.testing.assert_close(model(x.to(memory_format=torch.channels_last)), ref, rtol=1e-4, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x.to(memory_format=torch.channels_last))
    assert out.shape == (2, 10) and torch.isfinite(out.float()).all()


def one_line_error(fn):
    with pytest.raises(UserError) as info:
        fn()
    msg = str(info.value)
    assert msg and "\n" not in msg
    return msg


def test_unknown_model():
    msg = one_line_error(lambda: build_model("foo", 1, 8, 10))
    assert msg == "unknown model 'foo'; valid: fastnet, mlp, plain, resnet, resnet18, shallow"


@pytest.mark.parametrize("name,options,words", [
    ("resnet", {"depth": 21}, ["model.depth=21", "6n+2", "20"]),
    ("resnet", {"depth": 2}, ["model.depth=2", ">= 8"]),
    ("plain", {"depth": 3}, ["model.depth=3", ">= 4"]),
    ("resnet", {"shortcut": "B"}, ["model.shortcut=B", "conv, pad"]),
    ("resnet", {"dpeth": 20}, ["model.dpeth", "depth, shortcut, width"]),
    ("resnet18", {"depth": 18}, ["model.depth", "width"]),
    ("mlp", {"hidden": "wide"}, ["model.hidden=wide", "Integer"]),
    ("mlp", {"depth": 1.5}, ["model.depth=1.5", "Integer"]),
    ("fastnet", {"widths": []}, ["model.widths=[]", "at least 1"]),
    ("shallow", {"width": 0}, ["model.width=0"]),
])
def test_bad_options(name, options, words):
    msg = one_line_error(lambda: build_model(name, 1, 8, 10, **options))
    for word in words:
        assert word in msg


def test_bad_sizes():
    assert "image_size" in one_line_error(lambda: build_model("resnet", 3, 4, 10))
    assert "num_classes" in one_line_error(lambda: build_model("mlp", 3, 8, 0))


@pytest.mark.parametrize("name", NAMES)
def test_configs_match_defaults(name):
    """The typed config's defaults are the model's: one declaration builds the default model."""
    import inspect

    cfg = OmegaConf.structured(MODEL_CONFIGS[name])
    assert cfg.name == name
    options = {k: v for k, v in cfg.items() if k != "name"}
    signature = inspect.signature(MODELS[name]).parameters
    for key, value in OmegaConf.to_container(OmegaConf.create(options)).items():
        default = signature[key].default
        assert value == (list(default) if isinstance(default, tuple) else default), key
    # how the caller passes a config: lists arrive as ListConfig
    if name == "fastnet":
        options["widths"] = OmegaConf.create([8, 16, 16])
        assert isinstance(options["widths"], type(cfg.widths))
    model = build_model(cfg.name, 1, 8, 10, **options)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
