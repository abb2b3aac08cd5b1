"""hessian_secant against known answers: the plain minibatch secant is circular (its ε/η does not
move with the LR or the curvature), form=hvp measures each layer's curvature along its step, and
the default controller trains on digits."""
import math

import pytest
import torch

from controllers.hessian_secant import HessianSecant, walsh_signs
from tests.quadratic import Quadratic, run_controller

CURVATURES = [1.0, 10.0, 100.0]
PLAIN = dict(form="gradients", interval=1, ema=0.1, gain=1.0, normalize=False)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny tensors: intra-op threads only add contention."""


def plain_eps_over_lr(lr: float, seed: int = 0) -> torch.Tensor:
    """ε_l/η_l of the plain L1 secant on the noisy quadratic, the scale held at 1 (no feedback)."""
    controller = HessianSecant(**PLAIN, min_scale=1.0, max_scale=1.0)
    run_controller(controller, Quadratic(CURVATURES, shape=(8, 8), noise=10.0, seed=seed), steps=100, lr=lr,
                   momentum=0.9, seed=seed)
    return controller.estimate / lr


def test_plain_secant_is_circular_under_minibatch_noise():
    """Σ|Δθ| ∝ η while Σ|Δg| is the noise of two batches: ε/η is the same at LR η and 4η and in
    every layer, though 1/(h·η) spans 100× across the layers and 4× between the LRs."""
    low, high = plain_eps_over_lr(0.0005), plain_eps_over_lr(0.002)
    ratio = high / low
    assert ((ratio > 0.8) & (ratio < 1.25)).all(), ratio           # ε tracks η, not the curvature
    for eps_over_lr in (low, high):
        assert eps_over_lr.max() / eps_over_lr.min() < 1.5, eps_over_lr  # flat across h = 1, 10, 100
        assert ((eps_over_lr > 1) & (eps_over_lr < 3)).all(), eps_over_lr
    newton = 1 / (torch.tensor(CURVATURES) * 0.0005)               # what ε/η would be without noise
    assert (low < 0.2 * newton).all()


def test_hvp_recovers_each_layers_curvature_along_the_step():
    """Anisotropic layers (the curvature along u is a Rayleigh quotient, not h) coupled by
    cross-layer Hessian blocks: the probe sees u_lᵀH_ll u_l/u_lᵀu_l, cross terms excluded."""
    model = Quadratic(CURVATURES, shape=(6, 6), noise=3.0, spread=1.0, coupling=1.0, seed=1)
    curvature = [c.flatten() for c in model.element_curvatures()]
    expected = []

    def along_step(step, before):
        u = [(p.detach() - b).flatten() for p, b in zip(model.params(), before)]
        expected.append(torch.stack([(c * v * v).sum() / (v * v).sum() for c, v in zip(curvature, u)]))
        full = []
        for l, v in enumerate(u):  # with the cross-layer blocks: u_lᵀ(H u)_l / u_lᵀu_l
            cross = sum(model.coupling * (u[m] * v).sum() for m in (l - 1, l + 1) if 0 <= m < len(u))
            full.append(((curvature[l] * v * v).sum() + cross) / (v * v).sum())
        expected_full.append(torch.stack(full))

    expected_full = []
    controller = HessianSecant(interval=1, ema=1.0, min_scale=1e-3, max_scale=1e3)
    run_controller(controller, model, steps=8, lr=0.002, momentum=0.9, on_step=along_step)
    assert controller.count == 8
    assert torch.allclose(controller.last, expected[-1], rtol=1e-4), (controller.last, expected[-1])
    assert torch.allclose(controller.curvature, expected[-1], rtol=1e-4)
    assert ((expected_full[-1] - expected[-1]).abs() / expected[-1] > 0.1).any()  # the cross terms matter
    # the profile: η_l·c_l equal across layers, geometric mean 1
    scales = controller.scales(8)
    assert scales.log().mean().exp().item() == pytest.approx(1.0, rel=1e-5)
    product = scales * controller.curvature
    assert product.max() / product.min() == pytest.approx(1.0, rel=1e-5)


def test_hvp_smoothed_curvature_is_within_ten_percent_under_noise():
    """The default options on the isotropic quadratic with minibatch noise: c_l = h_l."""
    controller = HessianSecant(max_scale=1e3, min_scale=1e-3)
    run_controller(controller, Quadratic(CURVATURES, noise=10.0, coupling=0.3), steps=100, lr=0.001, momentum=0.9)
    assert controller.count == 100 // controller.interval
    assert torch.allclose(controller.curvature, torch.tensor(CURVATURES), rtol=0.1), controller.curvature


def test_signs_estimate_is_exact_over_a_walsh_period():
    """blocks=signs: one product per probe; over a period of 2^⌈log₂ L⌉ probes the cross-layer
    terms cancel, and the mean is the exact diagonal blocks."""
    signs = walsh_signs(3)
    assert signs.shape == (4, 3) and torch.equal(signs.T @ signs, 4 * torch.eye(3))
    model = Quadratic(CURVATURES, shape=(3, 4), spread=0.5, coupling=2.0, seed=2)
    exact, estimate = HessianSecant(blocks="exact"), HessianSecant(blocks="signs")
    plan_args = dict(steps=1, lr=0.0)
    run_controller(exact, model, **plan_args)
    run_controller(estimate, model, **plan_args)
    gen = torch.Generator().manual_seed(0)
    u = [torch.randn(p.shape, generator=gen) for p in model.params()]
    truth = exact._diagonal_blocks(lambda ps: model.loss(ps), u)
    draws = []
    for count in range(len(signs)):
        estimate.count = count
        draws.append(estimate._diagonal_blocks(lambda ps: model.loss(ps), u))
    assert not torch.allclose(draws[0], truth, rtol=0.05)  # one draw carries the cross terms
    assert torch.allclose(torch.stack(draws).mean(0), truth, rtol=1e-5)


def test_tiny_updates_keep_the_previous_estimate():
    """Where float32 cannot resolve the update (‖u‖ < min_update_ratio·‖θ‖) the estimate stays."""
    lrs = [0.001] * 4 + [1e-12] * 4
    controller = HessianSecant(interval=1, ema=0.5, max_scale=1e3, min_scale=1e-3)
    seen = []
    model = Quadratic(CURVATURES, noise=1.0)
    run_controller(controller, model, steps=len(lrs), lr=lrs, momentum=0.9,
                   on_step=lambda step, before: seen.append(controller.curvature.clone()))
    assert torch.allclose(seen[3], torch.tensor(CURVATURES), rtol=1e-4)
    for later in seen[4:]:
        assert torch.equal(later, seen[3])
    assert torch.isnan(controller.last).all()


def test_default_controller_trains_on_digits(tmp_path):
    from meta_llr.run import build_run
    from tests.conftest import compose_config

    cfg = compose_config("controller=hessian_secant", "model.width=8", "trainer.epochs=4", "trainer.batch_size=64",
                         "device=cpu",
                         "quiet=true", "trainer.checkpoint=false", "seed=0")
    run = build_run(cfg, tmp_path)
    summary = run.fit()
    assert summary["status"] == "finished"
    assert summary["final_test_acc"] >= 0.90, summary["final_test_acc"]
    controller = run.controller
    assert controller.count > 0 and bool(controller.have.all())
    assert math.isclose(controller.scales(run.step).log().mean().exp().item(), 1.0, rel_tol=0.05)
