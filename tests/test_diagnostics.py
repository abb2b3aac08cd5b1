"""Per-layer diagnostics: the curvature probe against known and independent answers."""
import csv
import math

import pytest
import torch
import torch.nn.functional as F

from meta_llr.diagnostics import layer_curvatures
from tests.quadratic import Quadratic


def read_rows(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_curvature_probe_returns_each_layers_curvature_on_the_quadratic():
    model = Quadratic(curvatures=[1.0, 10.0, 100.0], bias=True, seed=1)
    params = [list(layer.params) for layer in model.layers()]
    gen = torch.Generator().manual_seed(2)
    updates = [[torch.randn(p.shape, generator=gen) * 0.1 for p in layer] for layer in params]
    out = layer_curvatures(lambda ps: model.loss(ps), params, updates)
    for key in ("curvature", "curvature_full", "secant_curvature", "secant_l1"):
        assert torch.allclose(out[key], torch.tensor([1.0, 10.0, 100.0]), rtol=1e-5), (key, out[key])


def test_curvature_matches_double_backward_hessian_vector_product():
    """An MLP (no BatchNorm): forward-over-reverse equals reverse-over-reverse in float64."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    names = [n for n, _ in net.named_parameters()]
    params = [[net[0].weight, net[0].bias], [net[2].weight, net[2].bias]]
    updates = [[torch.randn_like(p) for p in layer] for layer in params]

    def loss_fn(ps):
        return F.cross_entropy(torch.func.functional_call(net, dict(zip(names, ps)), (x,)), y)

    out = layer_curvatures(loss_fn, params, updates)
    for l, (layer, u) in enumerate(zip(params, updates)):
        loss = loss_fn([p for layer_ in params for p in layer_])
        grads = torch.autograd.grad(loss, layer, create_graph=True)
        hvp = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, u)), layer)
        expected = sum((h * v).sum() for h, v in zip(hvp, u)) / sum((v * v).sum() for v in u)
        assert out["curvature"][l].item() == pytest.approx(expected.item(), rel=1e-4)


def test_curvature_probe_runs_on_resnet_with_batchnorm(make_config, tmp_path):
    from meta_llr.run import train
    from tests.conftest import TINY
    base = [o for o in TINY if not o.startswith("model")]
    run_dir = tmp_path / "resnet"
    summary = train(make_config(*base, "model=resnet", "model.depth=8", "model.width=4", "data.channels=3",
                                "trainer.epochs=2", "diagnostics.curvature_every=2"), run_dir)
    assert summary["status"] == "finished"
    rows = read_rows(run_dir / "layer_stats.csv")
    first = [r for r in rows if r["epoch"] == "1"]
    last = [r for r in rows if r["epoch"] == "2"]
    assert len(last) == len(summary["layers"]) >= 8
    assert all(r["curvature"] == "" for r in first), "probe only every 2 epochs"
    for r in last:
        for key in ("curvature", "curvature_full", "secant_curvature", "secant_l1", "lr_x_curvature"):
            assert math.isfinite(float(r[key])), (r["name"], key, r[key])
        assert float(r["lr_x_curvature"]) == pytest.approx(float(r["effective_lr"]) * float(r["curvature"]), rel=1e-5)
    assert "curvature" in summary["layer_stats"][last[0]["name"]]


def test_curvature_every_is_checked(make_config):
    from meta_llr.errors import UserError
    from meta_llr.run import build_run
    from tests.conftest import TINY
    with pytest.raises(UserError, match="curvature_every"):
        build_run(make_config(*TINY, "diagnostics.curvature_every=-1"), "/tmp/unused_curvature_check")


def test_l1_secant_is_not_the_curvature_along_the_step():
    """H = diag(1, 4), u = (2, 1): Σ|Hu|/Σ|u| = 6/3 = 2.0, but uᵀHu/uᵀu = 8/5 = 1.6."""
    theta = torch.tensor([0.3, -0.2])
    h = torch.tensor([1.0, 4.0])
    out = layer_curvatures(lambda ps: 0.5 * (h * ps[0] ** 2).sum(), [[theta]], [[torch.tensor([2.0, 1.0])]])
    assert out["secant_l1"].item() == pytest.approx(2.0, rel=1e-6)
    for key in ("curvature", "curvature_full", "secant_curvature"):
        assert out[key].item() == pytest.approx(1.6, rel=1e-6), key


def test_minibatch_secant_matches_a_hand_computation():
    """eps_over_lr's denominator: Σ|g_probe(θ(t+1)) − g(θ(t))| / Σ|u| per layer, on the device."""
    from meta_llr.diagnostics import Diagnostics
    from meta_llr.interface import Layer

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    layers = [Layer(0, "0", 0.0, [net[0].weight, net[0].bias], net[0].weight),
              Layer(1, "2", 1.0, [net[2].weight, net[2].bias], net[2].weight)]
    names = ["0.weight", "0.bias", "2.weight", "2.bias"]
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    diagnostics = Diagnostics({"rotation": False}, layers, torch.device("cpu"))
    diagnostics.set_probe_batch(net, x, y, F.cross_entropy, names)
    params = [p for layer in layers for p in layer.params]
    for p in params:
        p.grad = torch.randn_like(p)  # "this step's gradient" on another batch
    updates = [torch.randn_like(p) * 0.01 for p in params]
    got = diagnostics.minibatch_secant(updates)
    after = torch.autograd.grad(F.cross_entropy(net(x), y), params)
    expected = [sum((after[i] - params[i].grad).abs().sum() for i in pair) /
                sum(updates[i].abs().sum() for i in pair) for pair in ((0, 1), (2, 3))]
    assert torch.allclose(got, torch.stack(expected), rtol=1e-5)


def test_eps_over_lr_is_recorded_for_every_layer(tiny_run):
    summary, run_dir = tiny_run("diagnostics.curvature_every=1")
    rows = read_rows(run_dir / "layer_stats.csv")
    assert len(rows) == 2 * len(summary["layers"])
    for r in rows:
        for key in ("eps_over_lr", "eps_over_lr_same_batch"):
            assert math.isfinite(float(r[key])) and float(r[key]) > 0, (r["name"], key, r[key])
        secant = 1 / (float(r["eps_over_lr_same_batch"]) * float(r["effective_lr"]))
        assert secant == pytest.approx(float(r["secant_l1"]), rel=1e-4)
