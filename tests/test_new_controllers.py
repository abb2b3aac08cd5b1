"""``prodigy_layer`` (per-layer Prodigy distance estimates) and ``width_scaled`` (μP's LR table).

Prodigy: on a quadratic that separates across layers, with a known distance ``D_l = ‖x0_l −
x*_l‖`` per layer, each ``d_l`` never decreases, never exceeds ``D_l`` (the bound behind the
method, exact for a convex loss without noise) and grows from ``d0`` to a fixed fraction of it;
its state resumes bit for bit. μP: the multipliers of two widths of an MLP are Table 3's, and
doubling the width moves them as Table 3 says.
"""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from baselines.width_scaled import WidthScaled, fans, mup_multipliers
from controllers.prodigy_layer import ProdigyLayer
from meta_llr.interface import Layer, OptimizerSpec, Plan
from meta_llr.layers import group_layers, trace_layers
from meta_llr.models import MLP, Shallow
from meta_llr.run import build_run
from tests.conftest import TINY, compose_config
from tests.test_contract import count_host_syncs

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------ prodigy_layer
class SeparableQuadratic:
    """``f(x) = Σ_l ½ h_l ‖x_l − x*_l‖²`` with ``x*_l = x0_l + D_l·u_l``: ``‖u_l‖₂ = 1`` (SGD,
    ``D_l`` the Euclidean distance) or ``u_l ∈ {±1}`` (Adam, ``D_l`` the ℓ∞ distance)."""

    def __init__(self, distances, curvatures, unit: str, shape=(50, 4), seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.curvatures, self.params, self.targets = list(curvatures), [], []
        for distance in distances:
            x0 = torch.randn(shape, generator=gen)
            u = torch.randn(shape, generator=gen)
            u = u / u.norm() if unit == "l2" else u.sign()
            self.params.append(nn.Parameter(x0.clone()))
            self.targets.append(x0 + distance * u)
        count = len(self.params)
        self.layers = [Layer(index=l, name=f"layer{l}", depth=l / max(count - 1, 1), params=[p], weight=p)
                       for l, p in enumerate(self.params)]

    def loss(self) -> torch.Tensor:
        return sum(0.5 * h * (p - t).pow(2).sum() for p, t, h in zip(self.params, self.targets, self.curvatures))


def plan_for(steps: int, lr: float, optimizer: str, momentum: float = 0.9) -> Plan:
    spec = OptimizerSpec(name=optimizer, momentum=momentum if optimizer == "sgd" else 0.0)
    return Plan(total_steps=steps, steps_per_epoch=steps, epochs=1, device=CPU,
                lr_table=torch.full((steps,), lr), optimizer=spec)


class Driver:
    """The loop's order: backward, ``scales(step)`` (reads ``p.grad`` and the weights), the
    optimizer step at ``global_lr·scale_l`` (SGD with torch's momentum convention, or AdamW),
    gradients cleared."""

    def __init__(self, problem: SeparableQuadratic, controller: ProdigyLayer, plan: Plan):
        self.problem, self.controller, self.plan = problem, controller, plan
        self.adam = plan.optimizer.name == "adamw"
        self.momentum = plan.optimizer.momentum
        self.buffers = [torch.zeros_like(p) for p in problem.params]
        if self.adam:
            self.optimizer = torch.optim.AdamW([{"params": [p], "lr": 0.0} for p in problem.params],
                                               weight_decay=0.0)
        controller.setup(problem.layers, plan)
        self.step = 0

    def run(self, steps: int) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
        """``steps`` steps; returns the ``d`` after each ``[steps, L]``, the scales used and losses."""
        ds, scales_used, losses = [], [], []
        for _ in range(steps):
            loss = self.problem.loss()
            loss.backward()
            scales = self.controller.scales(self.step)
            lr = self.plan.global_lr(self.step)
            with torch.no_grad():
                if self.adam:
                    for group, scale in zip(self.optimizer.param_groups, scales):
                        group["lr"] = float(lr * scale)
                    self.optimizer.step()
                else:
                    for p, buffer, scale in zip(self.problem.params, self.buffers, scales):
                        buffer.mul_(self.momentum).add_(p.grad)
                        p.sub_(lr * scale * buffer)
            for p in self.problem.params:
                p.grad = None
            ds.append(self.controller.d.clone())
            scales_used.append(scales.clone())
            losses.append(float(loss.detach()))
            self.step += 1
        return torch.stack(ds), torch.stack(scales_used), losses


DISTANCES = (0.5, 5.0)


@pytest.mark.parametrize("optimizer, unit", [("sgd", "l2"), ("adamw", "linf")])
@pytest.mark.parametrize("mode", ["free", "relative"])
def test_prodigy_estimates_grow_towards_each_layers_distance(optimizer, unit, mode, one_thread):
    problem = SeparableQuadratic(DISTANCES, curvatures=(1.0, 10.0), unit=unit)
    controller = ProdigyLayer(mode=mode, d0=1e-6)
    ds, scales, losses = Driver(problem, controller, plan_for(300, 0.05, optimizer)).run(300)
    distances = torch.tensor(DISTANCES)
    assert (ds[1:] >= ds[:-1]).all(), "d_l must never decrease"
    assert (ds <= distances * (1 + 1e-4)).all(), f"d_l exceeds the true distance: {ds.max(0).values}"
    final = ds[-1]
    assert (final >= 0.25 * distances).all(), f"d_l did not reach the distance scale: {final} vs {distances}"
    assert final[1] > 5 * final[0], "the farther layer gets the larger estimate"
    assert (final / 1e-6 > 1e4).all(), "d_l grew from d0 by orders of magnitude"
    assert losses[-1] < 1e-3 * losses[0], "the quadratic is solved"
    assert torch.isfinite(scales).all() and (scales > 0).all()


def test_prodigy_free_mode_is_lr_free():
    """mode=free: the layers' LRs are γ·λ(t)·η*_l whatever trainer.lr; relative: they scale with it.
    (Equal up to float rounding: the free scale is divided by the peak LR and multiplied back.)"""
    runs = {}
    for mode in ("free", "relative"):
        for lr in (0.05, 0.5):
            problem = SeparableQuadratic(DISTANCES, curvatures=(1.0, 10.0), unit="l2")
            driver = Driver(problem, ProdigyLayer(mode=mode), plan_for(40, lr, "sgd"))
            _, scales, _ = driver.run(40)
            runs[mode, lr] = scales * lr  # the LRs used
    torch.testing.assert_close(runs["free", 0.05], runs["free", 0.5])
    # relative: the first step's LRs scale with the global LR (later, the trajectories differ)
    torch.testing.assert_close(runs["relative", 0.5][0], 10 * runs["relative", 0.05][0])


def test_prodigy_relative_profile_is_bounded():
    problem = SeparableQuadratic((0.01, 0.1, 1.0, 10.0), curvatures=(1.0, 1.0, 1.0, 1.0), unit="l2")
    _, scales, _ = Driver(problem, ProdigyLayer(mode="relative", min_scale=0.1, max_scale=10.0),
                          plan_for(100, 0.05, "sgd")).run(100)
    assert (scales >= 0.1 - 1e-7).all() and (scales <= 4.0 + 1e-6).all()  # ≤ L by the mean


@pytest.mark.parametrize("mode", ["free", "relative"])
def test_prodigy_resumes_bit_for_bit(mode):
    problem = SeparableQuadratic(DISTANCES, curvatures=(1.0, 10.0), unit="l2")
    plan = plan_for(60, 0.05, "sgd")
    driver = Driver(problem, ProdigyLayer(mode=mode), plan)
    driver.run(25)
    snapshot = io.BytesIO()
    torch.save({"controller": driver.controller.state_dict(), "params": [p.detach().clone() for p in problem.params],
                "buffers": [b.clone() for b in driver.buffers]}, snapshot)
    _, expected, _ = driver.run(20)

    snapshot.seek(0)
    saved = torch.load(snapshot, weights_only=False)
    with torch.no_grad():
        for p, value in zip(problem.params, saved["params"]):
            p.copy_(value)
    restored = Driver(problem, ProdigyLayer(mode=mode), plan)  # setup() sees the current weights...
    restored.controller.load_state_dict(saved["controller"])  # ...and the state restores x0 and all
    restored.buffers = [b.clone() for b in saved["buffers"]]
    restored.step = 25
    _, resumed, _ = restored.run(20)
    assert torch.equal(resumed, expected)


@pytest.mark.parametrize("optimizer, unit", [("sgd", "l2"), ("adamw", "linf")])
def test_prodigy_fused_reductions_agree(optimizer, unit):
    """The CUDA path of the per-layer reductions (one flat pass, float64 scan), forced on the
    CPU, gives the estimates of the per-layer path."""
    results = []
    for fused in (False, True):
        problem = SeparableQuadratic(DISTANCES, curvatures=(1.0, 10.0), unit=unit)
        driver = Driver(problem, ProdigyLayer(mode="free"), plan_for(60, 0.05, optimizer))
        driver.controller.per_layer.fused = fused
        results.append(driver.run(60)[0])
    torch.testing.assert_close(results[1], results[0], rtol=1e-4, atol=0.0)


@pytest.mark.parametrize("overrides", [["controller.mode=free"], ["trainer.optimizer=adamw"],
                                       ["controller.mode=free", "trainer.optimizer=adamw", "trainer.lr=0.001"]])
def test_prodigy_variants_in_the_loop_without_host_syncs(overrides, tmp_path):
    cfg = compose_config(*TINY, "controller=prodigy_layer", *overrides)
    run = build_run(cfg, tmp_path)
    for x, y in run.batches():
        with count_host_syncs() as syncs:
            run.train_step(x, y)
        assert syncs == [], f"host-device syncs inside the step: {syncs}"
    scales = run.trace[:run.step]
    assert torch.isfinite(scales).all() and (scales > 0).all()
    rows = run.controller.records()["prodigy_layer"]
    assert len(rows) == len(run.layers) and all(row["d"] >= 0.99e-6 for row in rows)  # d0, float32


@pytest.mark.parametrize("options", [{"mode": "global"}, {"d0": 0.0}, {"gamma": -1.0}, {"beta3": 1.5},
                                     {"beta2": 1.0}, {"min_scale": 2.0, "max_scale": 1.0}])
def test_prodigy_rejects_bad_options(options):
    with pytest.raises(ValueError):
        ProdigyLayer(**options)


# ------------------------------------------------------------------------------- width_scaled
def mlp_layers(hidden: int) -> list[Layer]:
    model = MLP(in_channels=1, image_size=8, num_classes=10, hidden=hidden, depth=2)
    layers, _ = group_layers(trace_layers(model, torch.zeros(2, 1, 8, 8)), None)
    return layers


def width_scales(layers, optimizer: str, base_fan_in: int, column: str = "auto") -> torch.Tensor:
    controller = WidthScaled(base_fan_in=base_fan_in, column=column)
    controller.setup(layers, plan_for(10, 0.1, optimizer))
    return controller.scales(0)


@pytest.mark.parametrize("hidden", [16, 32])
def test_width_scaled_multipliers_follow_table_3(hidden):
    layers = mlp_layers(hidden)
    assert [fans(layer.weight) for layer in layers] == [(64, hidden), (hidden, hidden), (hidden, 10)]
    m = hidden / 16  # width ratio to base_fan_in=16
    # SGD column: input weights ∝ fan_out, hidden ∝ 1, output ∝ 1/fan_in
    torch.testing.assert_close(width_scales(layers, "sgd", 16), torch.tensor([m, 1.0, 1 / m]))
    # Adam column: input ∝ 1, hidden ∝ 1/fan_in, output ∝ 1/fan_in
    torch.testing.assert_close(width_scales(layers, "adamw", 16), torch.tensor([1.0, 1 / m, 1 / m]))
    # column= overrides the optimizer
    torch.testing.assert_close(width_scales(layers, "sgd", 16, column="adam"), width_scales(layers, "adamw", 16))


def test_doubling_the_width_moves_the_scales_as_mup_says():
    narrow, wide = mlp_layers(64), mlp_layers(128)
    for base in (16, 64, 100):
        sgd = width_scales(wide, "sgd", base) / width_scales(narrow, "sgd", base)
        adam = width_scales(wide, "adamw", base) / width_scales(narrow, "adamw", base)
        torch.testing.assert_close(sgd, torch.tensor([2.0, 1.0, 0.5]))   # input ×2, hidden ×1, output ×½
        torch.testing.assert_close(adam, torch.tensor([1.0, 0.5, 0.5]))  # input ×1, hidden ×½, output ×½


def test_width_scaled_conv_fan_in_counts_the_kernel_area():
    model = Shallow(in_channels=1, image_size=8, num_classes=10, width=8)
    layers, _ = group_layers(trace_layers(model, torch.zeros(2, 1, 8, 8)), None)
    shapes = [fans(layer.weight) for layer in layers]
    assert shapes == [(9, 72), (72, 144), (144, 288), (32, 10)]
    rows = mup_multipliers(shapes, base_fan_in=72, column="adam")
    assert [row["role"] for row in rows] == ["input", "hidden", "hidden", "output"]
    assert [row["multiplier"] for row in rows] == [1.0, 1.0, 0.5, 72 / 32]
    assert mup_multipliers([(64, 10)], 16, "sgd")[0]["multiplier"] == 1.0  # one layer: finite to finite


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_width_scaled_in_a_run(optimizer, tmp_path):
    cfg = compose_config(*TINY, "controller=width_scaled", "controller.base_fan_in=8", f"trainer.optimizer={optimizer}")
    run = build_run(cfg, tmp_path)
    # TINY: mlp (2 hidden layers of 16) on 8x8x1 inputs, 4 classes -> width ratio 2
    expected = [2.0, 1.0, 0.5] if optimizer == "sgd" else [1.0, 0.5, 0.5]
    assert run.controller.scales(0).tolist() == expected
    assert run.scale_1d == (optimizer == "sgd")  # Adam column: biases keep the global LR, as Table 3
    x, y = next(iter(run.batches()))
    run.train_step(x, y)
    global_lr = float(run.plan.lr_table[0])
    lrs = run.flat_step.param_lrs(run.controller.scales(0), global_lr)
    for layer in run.layers:
        for p in layer.params:
            want = expected[layer.index] * global_lr if p.dim() > 1 or run.scale_1d else global_lr
            assert lrs[p] == pytest.approx(want, rel=1e-6)
    rows = run.controller.records()["width_scaled"]
    assert [row["role"] for row in rows] == ["input", "hidden", "output"]


@pytest.mark.parametrize("options", [{"base_fan_in": 0}, {"column": "rmsprop"}])
def test_width_scaled_rejects_bad_options(options):
    with pytest.raises(ValueError):
        WidthScaled(**options)
