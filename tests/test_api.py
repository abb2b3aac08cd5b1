"""The Python API and plugins: your own nn.Module on your own tensors, pretrained weights kept,
and a controller from an installed package that meta_llr knows nothing about."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import meta_llr
from meta_llr.errors import UserError

QUICK = ["trainer.epochs=2", "trainer.batch_size=32", "device=cpu", "quiet=true", "trainer.checkpoint=false"]


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


def blobs(n: int, seed: int):
    """Three classes of 6x6 images told apart by where a bright square sits."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=gen)
    x = torch.randint(0, 60, (n, 1, 6, 6), generator=gen, dtype=torch.uint8)
    for k in range(3):
        x[y == k, :, 2 * k:2 * k + 2, 1:5] = 250
    return x, y


def test_fit_trains_a_user_module_on_user_tensors(tmp_path):
    x, y = blobs(192, 0)
    xt, yt = blobs(96, 1)
    result = meta_llr.fit(model=TwoLayer(), data=(x, y, xt, yt), controller="depth_linear",
                          overrides=[*QUICK, "controller.first=2.0"], out_dir=tmp_path / "run")
    assert result.summary["status"] == "finished" and result.summary["final_test_acc"] >= 0.9
    assert result.run_dir == tmp_path / "run"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["model"] == "TwoLayer" and summary["data"] == "tensors"
    header = (tmp_path / "run" / "llr.csv").read_text().splitlines()[0].split(",")
    assert header[3:] == ["conv", "head"]
    first = (tmp_path / "run" / "llr.csv").read_text().splitlines()[1].split(",")
    assert [float(v) for v in first[3:]] == [2.0, 0.5]  # depth_linear first=2.0 last=0.5 (default)


def test_fit_keeps_pretrained_weights_and_float_images(tmp_path):
    x, y = blobs(96, 0)
    xt, yt = blobs(48, 1)
    model = TwoLayer()
    with torch.no_grad():
        model.conv.weight.fill_(0.01)
    pretrained = {k: v.clone() for k, v in model.state_dict().items()}
    # scale 0 everywhere but the head: the pretrained conv must come out exactly as it went in
    result = meta_llr.fit(model=model, data=(x.float() / 255, y, xt.float() / 255, yt), controller="fixed_linear",
                          overrides=[*QUICK, "trainer.epochs=1", "controller.start=[0.0,1.0]",
                                     "controller.end=[0.0,1.0]"], out_dir=tmp_path)
    assert result.model is model
    assert torch.equal(model.conv.weight, pretrained["conv.weight"])
    assert not torch.equal(model.head.weight, pretrained["head.weight"])


def test_fit_with_names_and_bad_arguments(tmp_path):
    result = meta_llr.fit(data="digits", controller="uniform", overrides=[*QUICK, "model=mlp", "model.hidden=16"],
                          out_dir=tmp_path)
    assert result.summary["data"] == "digits" and result.summary["model"] == "mlp"
    x, y = blobs(8, 0)
    cases = [
        (dict(model="resnet"), "model must be a torch.nn.Module"),
        (dict(data=(x, y)), "data must be (x_train, y_train, x_test, y_test)"),
        (dict(data=(x[:, 0], y, x[:, 0], y)), "x_train must be images"),
        (dict(controller="nope"), "unknown controller 'nope'"),
        (dict(overrides=["trainer.epochs=0"]), "trainer.epochs=0 is out of range"),
    ]
    for kwargs, words in cases:
        with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
            meta_llr.fit(out_dir=tmp_path / "bad", **kwargs)


def test_compose_returns_the_checked_config():
    cfg = meta_llr.compose(["controller=llrd", "controller.decay=0.5"])
    assert cfg.controller.decay == 0.5 and cfg.trainer.epochs == 10
    with pytest.raises(UserError, match="controller=llrd: decay must be in"):
        meta_llr.compose(["controller=llrd", "controller.decay=2"])


PLUGIN = '''
"""A controller that lives outside meta_llr: every layer at a fixed scale."""
import torch
from meta_llr import Controller, register


@register("plugin_halve")
class PluginHalve(Controller):
    def __init__(self, factor: float = 0.5):
        if factor < 0:
            raise ValueError(f"factor must be >= 0, got {factor}")
        self.factor = factor

    def setup(self, layers, plan):
        super().setup(layers, plan)
        self.fixed = torch.full((self.num_layers,), self.factor, device=plan.device)

    def scales(self, step):
        return self.fixed
'''


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    """A tiny package declaring the entry point, installed with pip into a private folder."""
    root = tmp_path_factory.mktemp("plugin")
    src = root / "src"
    (src / "halve_plugin").mkdir(parents=True)
    (src / "halve_plugin" / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    (src / "pyproject.toml").write_text(textwrap.dedent('''
        [build-system]
        requires = ["setuptools>=64"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "halve-plugin"
        version = "0.1"
        [project.entry-points."meta_llr.controllers"]
        plugin_halve = "halve_plugin"
        '''))
    target = root / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--target", str(target), str(src)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return target


def test_an_installed_plugin_trains_from_the_cli_and_the_api(plugin_dir, tmp_path, monkeypatch):
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_dir), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "meta_llr.train", "controller=plugin_halve", "controller.factor=0.25",
                           "model=mlp", "model.hidden=16", "trainer.epochs=1", "device=cpu", "quiet=true",
                           f"hydra.run.dir={tmp_path / 'cli'}"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "cli" / "summary.json").read_text())["controller"] == "plugin_halve"
    row = (tmp_path / "cli" / "llr.csv").read_text().splitlines()[1].split(",")
    assert {float(v) for v in row[3:]} == {0.25}
    bad = subprocess.run([sys.executable, "-m", "meta_llr.train", "controller=plugin_halve", "controller.factor=-1"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: controller=plugin_halve: factor must be >= 0, got -1.0"

    monkeypatch.syspath_prepend(str(plugin_dir))
    from hydra.core.config_store import ConfigStore

    from meta_llr.registry import CONTROLLER_CONFIGS, CONTROLLERS, load_plugins

    try:
        assert "plugin_halve" in load_plugins()
        result = meta_llr.fit(controller="plugin_halve", overrides=[*QUICK, "model=mlp", "model.hidden=16"],
                              out_dir=tmp_path / "api")
        assert result.summary["status"] == "finished" and result.summary["controller"] == "plugin_halve"
    finally:  # this process's other tests must not see the plugin
        CONTROLLERS.pop("plugin_halve", None)
        CONTROLLER_CONFIGS.pop("plugin_halve", None)
        ConfigStore.instance().repo["controller"].pop("plugin_halve.yaml", None)
        sys.modules.pop("halve_plugin", None)
