"""Adaptive controllers against known answers (the quadratic of tests/quadratic.py and
hand-made tensors), plus the records hook and the same_batch path inside the real loop."""
import csv
import math

import pytest
import torch

from controllers.adam_probe import AdamProbe
from controllers.hessian_secant import HessianSecant
from controllers.hypergrad import Hypergrad
from controllers.lars import Lars
from controllers.layca import Layca, layca_multipliers
from meta_llr.interface import Layer, Plan
from tests.quadratic import Quadratic, run_controller

CURVATURES = torch.tensor([1.0, 10.0, 100.0])


# ------------------------------------------------------------------ hessian_secant
# The secant forms with their original options (form=hvp, the default, is in tests/test_secant.py).
OLD = dict(form="gradients", interval=1, ema=0.1, gain=1.0, normalize=False, min_scale=0.01, max_scale=100.0)


@pytest.mark.parametrize("form,momentum", [("gradients", 0.0), ("gradients", 0.9), ("snapshots", 0.0)])
def test_secant_recovers_each_layers_curvature(form, momentum):
    controller = HessianSecant(**{**OLD, "form": form, "gain": 0.3, "max_scale": 1e4})
    run_controller(controller, Quadratic(), steps=12, lr=0.001, momentum=momentum)
    assert controller.count >= 8
    assert torch.allclose(controller.estimate * CURVATURES, torch.ones(3), rtol=0.05), controller.estimate


def test_secant_interval_and_its_lr_follow_the_estimate():
    controller = HessianSecant(**{**OLD, "interval": 3, "gain": 0.5, "max_scale": 1e4})
    out = run_controller(controller, Quadratic(), steps=15, lr=0.001)
    assert controller.count == 4  # pairs at steps 0, 3, 6, 9, 12
    assert torch.allclose(controller.estimate * CURVATURES, torch.ones(3), rtol=0.05)
    # after the first estimate the layer LR is gain/h: scale = gain / (h · lr)
    assert torch.allclose(out["scales"][-1], 0.5 / (CURVATURES * 0.001), rtol=0.05)


def test_same_batch_secant_is_unbiased_under_gradient_noise():
    estimates = {}
    for same_batch in (False, True):
        controller = HessianSecant(**{**OLD, "same_batch": same_batch, "min_scale": 1.0, "max_scale": 1.0})  # scale 1
        run_controller(controller, Quadratic(noise=1.0), steps=60, lr=0.005, seed=3)
        estimates[same_batch] = controller.estimate * CURVATURES
    assert torch.allclose(estimates[True], torch.ones(3), rtol=0.05), estimates[True]
    assert (estimates[False] < 0.5).all(), estimates[False]  # minibatch noise in Δg biases it low


def test_secant_normalize_keeps_the_profile_at_geometric_mean_gain():
    controller = HessianSecant(**{**OLD, "normalize": True, "gain": 2.0, "min_scale": 1e-4, "max_scale": 1e4})
    out = run_controller(controller, Quadratic(), steps=6, lr=0.001)
    last = out["scales"][-1]
    assert last.log().mean().exp().item() == pytest.approx(2.0, rel=1e-5)  # gain × geometric mean 1
    assert (last * CURVATURES).std() / (last * CURVATURES).mean() < 0.05  # ∝ 1/h


def test_bad_options_are_value_errors():
    for cls, kwargs in [(HessianSecant, {"form": "snapshots", "same_batch": True}), (HessianSecant, {"interval": 0}),
                        (HessianSecant, {"same_batch": True}), (HessianSecant, {"blocks": "all"}),
                        (HessianSecant, {"power": -1.0}), (HessianSecant, {"min_update_ratio": 1.0}),
                        (Layca, {"alpha": 1.0}), (Layca, {"other_params": "adam"}), (Lars, {"trust": 0.0}),
                        (Hypergrad, {"rule": "newton"}), (AdamProbe, {"quantiles": [1.5]}),
                        (AdamProbe, {"min_scale": 2.0, "max_scale": 1.0}),
                        (AdamProbe, {"quantiles": [0.1, 0.104]})]:   # one CSV column q10 for both
        with pytest.raises(ValueError):
            cls(**kwargs)


def test_secant_takes_a_late_layers_first_value_as_it_is():
    """Layer 1 gets its first gradient a step after layer 0: its first valid secant is its ε,
    not an EMA step from the placeholder 1 (0.5 = 1/h on this quadratic, in both layers)."""
    torch.manual_seed(0)
    weights = [torch.randn(8, 4), torch.randn(8, 4)]
    layers = [Layer(index=i, name=f"l{i}", depth=float(i), params=[w], weight=w) for i, w in enumerate(weights)]
    lr, h = 0.1, 2.0
    controller = HessianSecant(**{**OLD, "ema": 0.3, "min_scale": 1e-3, "max_scale": 1e3})
    controller.setup(layers, Plan(total_steps=4, steps_per_epoch=4, epochs=1, device=torch.device("cpu"),
                                  lr_table=torch.full((4,), lr)))
    seen = []
    for step in range(4):
        weights[0].grad = h * weights[0]
        weights[1].grad = h * weights[1] if step >= 1 else torch.zeros_like(weights[1])
        seen.append(controller.scales(step).clone())
        with torch.no_grad():
            for w in weights:
                w.sub_(lr * w.grad)
        controller.observe(step, {"global_lr": torch.tensor(lr), "scales": torch.ones(2)})
        if step == 1:
            assert controller.have.tolist() == [True, False] and controller.estimate[1] == 1.0
    assert torch.allclose(controller.estimate, torch.full((2,), 1 / h), rtol=1e-5), controller.estimate
    assert torch.allclose(seen[2], torch.tensor([1 / (h * lr), 1.0]), rtol=1e-5)  # no estimate: the global LR


# ------------------------------------------------------------------ hypergrad
@pytest.mark.parametrize("lr", [0.025, 0.012])  # the h=100 layer starts unstable (η·h = 2.5) / all stable
def test_hypergrad_reaches_stable_layer_lrs_and_beats_uniform(lr):
    uniform = run_controller(Hypergrad(beta=0.0), Quadratic(), steps=300, lr=lr)
    controller = Hypergrad(beta=0.05)
    out = run_controller(controller, Quadratic(), steps=300, lr=lr)
    layer_lr_times_h = out["scales"][-1] * lr * CURVATURES
    assert (layer_lr_times_h < 2).all(), layer_lr_times_h
    uniform_loss = uniform["final_loss"] if math.isfinite(uniform["final_loss"]) else math.inf  # diverged
    assert out["final_loss"] < 0.1 * uniform_loss, (out["final_loss"], uniform_loss)
    assert out["scales"][-1][0] > 1.5  # the flat layer's LR was raised


def test_hypergrad_additive_rule_follows_the_gradient_product():
    """One step by hand: α ← α + β·g(t)·g(t−1) for plain SGD (h = −g·u/η)."""
    model = Quadratic(curvatures=[1.0, 10.0, 100.0])
    params = [p.detach().clone() for p in model.params()]
    controller = Hypergrad(rule="additive", beta=1e-3)
    run_controller(controller, model, steps=2, lr=0.001)
    g0 = [h * (p - t) for h, p, t in zip([1.0, 10.0, 100.0], params, model.targets())]
    p1 = [p - 0.001 * g for p, g in zip(params, g0)]
    g1 = [h * (p - t) for h, p, t in zip([1.0, 10.0, 100.0], p1, model.targets())]
    expected = torch.tensor([0.001 + 1e-3 * (a * b).sum().item() for a, b in zip(g0, g1)])
    assert torch.allclose(controller.alpha, expected.clamp(1e-5, 0.1), rtol=1e-4)


def test_hypergrad_measures_from_the_first_positive_lr():
    """A schedule that starts at 0 (triangular, low=0): α(0) is its first positive LR, so the
    scales start at 1 instead of 0/0."""
    w = torch.randn(4, 3)
    controller = Hypergrad()
    controller.setup([Layer(index=0, name="l0", depth=0.0, params=[w], weight=w)],
                     Plan(total_steps=3, steps_per_epoch=3, epochs=1, device=torch.device("cpu"),
                          lr_table=torch.tensor([0.0, 0.05, 0.1])))
    assert controller.alpha0.item() == pytest.approx(0.05)
    assert torch.equal(controller.scales(0), torch.ones(1))


# ------------------------------------------------------------------ layca
def test_layca_multipliers_are_the_papers():
    m = 0.5 ** (5 / 2)
    assert torch.allclose(layca_multipliers(3, 0.5), torch.tensor([m * m, m, 1.0], dtype=torch.float64))
    assert torch.allclose(layca_multipliers(3, -0.5), torch.tensor([1.0, m, 0.5 ** 5], dtype=torch.float64))
    assert torch.equal(layca_multipliers(4, 0.0), torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize("other_params", ["none", "sgd"])
def test_layca_rotates_each_layer_by_atan_rho_and_keeps_its_norm(other_params):
    model = Quadratic(bias=True, shape=(6, 5))
    initial = [layer.weight.detach().norm().item() for layer in model.layers()]
    initial_bias = [layer.params[1].detach().clone() for layer in model.layers()]
    lr, alpha = 0.1, 0.6
    rho = lr * layca_multipliers(3, alpha)
    angles, norms = [], []

    def check(step, before):
        for l, layer in enumerate(model.layers()):
            w0, w1 = before[2 * l].double().flatten(), layer.weight.detach().double().flatten()
            cos = (w0 @ w1) / (w0.norm() * w1.norm())
            sin = (w1 - cos * w1.norm() / w0.norm() * w0).norm() / w1.norm()
            angles.append((math.atan2(sin.item(), cos.item()), math.atan(rho[l].item())))
            norms.append((w1.norm().item(), initial[l]))

    run_controller(Layca(alpha=alpha, other_params=other_params), model, steps=5, lr=lr, momentum=0.9,
                   on_step=check)
    for measured, expected in angles:
        assert measured == pytest.approx(expected, abs=1e-5)
    for measured, expected in norms:
        assert measured == pytest.approx(expected, rel=1e-5)
    moved = [not torch.equal(layer.params[1].detach(), b) for layer, b in zip(model.layers(), initial_bias)]
    assert moved == ([False] * 3 if other_params == "none" else [True] * 3)


@pytest.mark.parametrize("gradient,turns", [(0.0, False), (1e-7, False), (1e-3, True)])
def test_layca_turns_only_by_an_orthogonal_step_above_rounding(gradient, turns):
    """A step of weight decay alone is parallel to w: its ‖s⊥‖² is rounding noise (once 0.16 rad
    of turn at ρ = 0.1), so the layer is only renormalised; a resolvable one turns by atan(ρ)."""
    torch.manual_seed(0)
    w = torch.randn(64, 32)
    w0 = w.clone()
    controller = Layca()
    controller.setup([Layer(index=0, name="l0", depth=0.0, params=[w], weight=w)],
                     Plan(total_steps=1, steps_per_epoch=1, epochs=1, device=torch.device("cpu"),
                          lr_table=torch.full((1,), 0.1)))
    direction = torch.randn_like(w)
    w.sub_(0.05 * (5e-4 * w + gradient * w.norm() * direction / direction.norm()))
    controller.transform_update(0, [[w0.clone()]])
    cos = torch.nn.functional.cosine_similarity(w0.flatten().double(), w.flatten().double(), 0).item()
    assert math.acos(min(cos, 1.0)) == pytest.approx(math.atan(0.1) if turns else 0.0, abs=1e-3)
    assert w.norm().item() == pytest.approx(w0.norm().item(), rel=1e-4)


# ------------------------------------------------------------------ lars
def hand_layers():
    w0 = torch.tensor([[3.0, 4.0], [0.0, 0.0]], requires_grad=True)   # ‖w‖ = 5
    b0 = torch.tensor([1.0, 2.0], requires_grad=True)
    w1 = torch.tensor([[1.0, 0.0, 0.0]], requires_grad=True)          # ‖w‖ = 1
    w2 = torch.tensor([[2.0], [0.0]], requires_grad=True)               # zero gradient below
    w0.grad, b0.grad = torch.tensor([[0.0, 0.5], [0.0, 0.0]]), torch.tensor([100.0, 0.0])
    w1.grad, w2.grad = torch.tensor([[0.0, 0.02, 0.0]]), torch.zeros(2, 1)
    layers = [Layer(0, "a", 0.0, [w0, b0], w0), Layer(1, "b", 0.5, [w1], w1), Layer(2, "c", 1.0, [w2], w2)]
    return layers


@pytest.mark.parametrize("trust_clip", [False, True])
def test_lars_matches_the_formula_on_hand_made_tensors(trust_clip):
    layers = hand_layers()
    lr = 0.5
    plan = Plan(total_steps=4, steps_per_epoch=4, epochs=1, device=torch.device("cpu"),
                lr_table=torch.full((4,), lr))
    controller = Lars(trust=0.01, wd=0.1, trust_clip=trust_clip, min_scale=1e-6)
    controller.setup(layers, plan)
    assert controller.scale_1d is False  # biases keep the global LR
    # scales(t) reads this step's gradients (the loop calls it after backward)
    ratio = torch.tensor([0.01 * 5 / (0.5 + 0.1 * 5), 0.01 * 1 / (0.02 + 0.1 * 1), 1.0])  # bias ignored
    expected = torch.clamp(ratio / lr, max=1.0) if trust_clip else ratio
    assert torch.allclose(controller.scales(0), expected, rtol=1e-6)


def test_lars_with_1d_tensors_included_counts_the_bias():
    layers = hand_layers()
    plan = Plan(total_steps=2, steps_per_epoch=2, epochs=1, device=torch.device("cpu"), lr_table=torch.ones(2))
    controller = Lars(trust=0.01, wd=0.1, exclude_1d=False, min_scale=1e-6)
    controller.setup(layers, plan)
    assert controller.scale_1d is True
    w, g = math.sqrt(25 + 5), math.sqrt(0.25 + 100.0 ** 2)
    assert controller.scales(0)[0].item() == pytest.approx(0.01 * w / (g + 0.1 * w), rel=1e-6)


# ------------------------------------------------------------------ adam_probe
def adam_layers(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [Layer(l, f"l{l}", l / 2, [p], p) for l, p in
            enumerate(torch.randn(5, 4, generator=gen).requires_grad_() for _ in range(3))]


def drive(controller, layers, grads_per_step):
    plan = Plan(total_steps=len(grads_per_step), steps_per_epoch=len(grads_per_step), epochs=1,
                device=torch.device("cpu"), lr_table=torch.full((len(grads_per_step),), 0.1))
    controller.setup(layers, plan)
    for step, grads in enumerate(grads_per_step):
        for layer, g in zip(layers, grads):
            layer.params[0].grad = g.clone()
        controller.observe(step, {})


def test_adam_probe_scales_a_layer_with_100x_gradients_by_one_hundredth():
    gen = torch.Generator().manual_seed(1)
    base = [torch.randn(5, 4, generator=gen) for _ in range(20)]
    grads = [[g, g, 100 * g] for g in base]
    controller = AdamProbe(min_scale=1e-4)
    drive(controller, adam_layers(), grads)
    s = controller.scales(20)
    assert s[2].item() == pytest.approx(s[0].item() / 100, rel=1e-4)
    assert s[0].item() == pytest.approx(s[1].item(), rel=1e-6)
    assert (s.log().mean().exp()).item() == pytest.approx(1.0, rel=1e-5)  # geometric mean 1


def test_adam_probe_quantiles_match_a_direct_adam_run():
    gen = torch.Generator().manual_seed(2)
    grads = [[torch.randn(5, 4, generator=gen) * (10 ** l) for l in range(3)] for _ in range(7)]
    layers = adam_layers()
    controller = AdamProbe(apply=False, probe_every=3, beta1=0.8, beta2=0.99, eps=1e-6)
    drive(controller, layers, grads)
    assert torch.equal(controller.scales(7), torch.ones(3))
    rows = controller.records()["adam_probe"]
    reference = [p.detach().double().clone().requires_grad_() for p in (layer.params[0] for layer in layers)]
    adam = torch.optim.Adam(reference, lr=1.0, betas=(0.8, 0.99), eps=1e-6)
    checked = 0
    for step, step_grads in enumerate(grads):
        before = [p.detach().clone() for p in reference]
        for p, g in zip(reference, step_grads):
            p.grad = g.double()
        adam.step()
        if step % 3 == 0:
            for l, (p, b) in enumerate(zip(reference, before)):
                sizes = (p.detach() - b).abs().flatten()
                expected = torch.quantile(sizes, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
                row = next(r for r in rows if r["step"] == step and r["layer"] == l)
                measured = torch.tensor([row["q10"], row["q50"], row["q90"]], dtype=torch.float64)
                assert torch.allclose(measured, expected, rtol=1e-4), (step, l, measured, expected)
                checked += 1
    assert checked == 9 and len(rows) == 9


# ------------------------------------------------------------------ inside the real loop
def test_records_hook_writes_adam_probe_csv(tiny_run):
    summary, run_dir = tiny_run("controller=adam_probe", "controller.apply=false", "controller.probe_every=2")
    assert summary["status"] == "finished"
    with open(run_dir / "adam_probe.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["step"] for r in rows} == {"0", "2", "4", "6"} and len(rows) == 4 * len(summary["layers"])
    assert all(float(r["q10"]) <= float(r["q50"]) <= float(r["q90"]) for r in rows)


def test_same_batch_runs_in_the_loop_without_host_syncs(make_config, tmp_path):
    from meta_llr.run import build_run
    from tests.conftest import TINY
    from tests.test_contract import count_host_syncs
    run = build_run(make_config(*TINY, "controller=hessian_secant", "controller.form=gradients",
                                "controller.interval=1", "controller.same_batch=true"), tmp_path)
    for x, y in run.batches():
        with count_host_syncs() as syncs:
            run.train_step(x, y)
        assert syncs == []
    assert run.controller.count == run.steps_per_epoch - 1
    assert torch.isfinite(run.controller.estimate).all() and (run.controller.estimate > 0).all()
