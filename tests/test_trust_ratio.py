"""LARS, LARC and LAMB on this step's gradient: one real step of the loop against the papers'
updates written out by hand (You et al. 2017, arXiv 1708.03888; You et al. 2019, arXiv 1904.00962)."""
import pytest
import torch

from meta_llr.run import build_run
from tests.conftest import TINY, compose_config


def first_step(out_dir, *overrides, random_biases=False):
    """The run, its first batch, the parameters before the step and this step's gradients
    (``random_biases``: 1-D parameters drawn in ±0.5 first, so a decay on them shows)."""
    run = build_run(compose_config(*TINY, "model.depth=2", *overrides), out_dir)
    x, y = next(iter(run.batches()))
    params = [p for layer in run.layers for p in layer.params]
    if random_biases:
        with torch.no_grad():
            for p in params:
                if p.dim() == 1:
                    p.copy_(torch.rand(p.shape, generator=torch.Generator().manual_seed(p.numel())) - 0.5)
    before = [p.detach().clone() for p in params]
    loss = run._loss_fn(run.model(run.normalize(x)), y)
    grads = torch.autograd.grad(loss, params)
    run.train_step(x, y)
    return run, params, before, grads


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("clip", [False, True])
def test_lars_and_larc_one_step_by_hand(momentum, clip, tmp_path):
    lr, wd, trust = 0.5, 5e-4, 0.02
    run, params, before, grads = first_step(
        tmp_path,
        "controller=lars", f"controller.trust={trust}", f"controller.wd={wd}", f"controller.trust_clip={clip}",
        "controller.min_scale=1e-9", f"trainer.lr={lr}", "schedule=constant", f"trainer.momentum={momentum}",
        "trainer.nesterov=false", f"trainer.weight_decay={wd}")
    for p, w, g in zip(params, before, grads):
        d = g + wd * w                      # the paper's ∇L(w) + β·w
        if p.dim() > 1:                     # kernels: local LR γ·λ (LARC: min(λ/γ, 1)·γ)
            local = trust * w.norm() / (g.norm() + wd * w.norm())
            step = lr * (torch.clamp(local / lr, max=1.0) if clip else local)
        else:                               # biases: the global LR
            step = lr
        expected = w - step * d             # v = γλ·d from v = 0, w ← w − v
        assert torch.allclose(p.detach(), expected, rtol=1e-5, atol=1e-7)
    trace = run.trace[0]
    kernels = [(w, g) for w, g, p in zip(before, grads, params) if p.dim() > 1]
    ratios = torch.stack([trust * w.norm() / (g.norm() + wd * w.norm()) for w, g in kernels])
    assert torch.allclose(trace, torch.clamp(ratios / lr, max=1.0) if clip else ratios, rtol=1e-5)


def test_lamb_one_step_by_hand(tmp_path):
    lr, decay, eps = 0.01, 0.01, 1e-8
    run, params, before, grads = first_step(tmp_path, "controller=lamb", "trainer.optimizer=adamw", f"trainer.lr={lr}",
                                            "schedule=constant", f"trainer.weight_decay={decay}")
    for p, w, g in zip(params, before, grads):
        # AdamW's first moments: m̂ = g, v̂ = g² (bias-corrected), direction r = m̂/(√v̂+ε) + λw
        r = g / (g.abs() + eps) + decay * w
        trust = w.norm() / r.norm() if p.dim() > 1 else torch.tensor(1.0)
        assert torch.allclose(p.detach(), w - lr * trust * r, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("decay_1d", [True, False])
def test_lamb_with_1d_parameters_one_step_by_hand(decay_1d, tmp_path):
    """exclude_1d=false: biases join their layer's trust ratio with the decay the run gives them."""
    lr, decay, eps = 0.01, 0.1, 1e-8
    run, params, before, grads = first_step(tmp_path, "controller=lamb", "controller.exclude_1d=false",
                                            "trainer.optimizer=adamw", f"trainer.lr={lr}", "schedule=constant",
                                            f"trainer.weight_decay={decay}", f"trainer.decay_1d={decay_1d}",
                                            random_biases=True)
    i = 0
    for layer in run.layers:
        n = len(layer.params)
        ws, gs = before[i:i + n], grads[i:i + n]
        rs = [g / (g.abs() + eps) + (decay * w if w.dim() > 1 or decay_1d else 0) for w, g in zip(ws, gs)]
        trust = torch.stack([w.norm() for w in ws]).norm() / torch.stack([r.norm() for r in rs]).norm()
        for p, w, r in zip(params[i:i + n], ws, rs):
            assert torch.allclose(p.detach(), w - lr * trust * r, rtol=1e-5, atol=1e-7)
        i += n


def test_lamb_needs_adamw():
    from meta_llr.errors import UserError

    with pytest.raises(UserError, match="trainer.optimizer=adamw"):
        build_run(compose_config(*TINY, "controller=lamb"), "/tmp/unused-trust-ratio")
    with pytest.raises(UserError, match="trainer.norm_lr_mult=1"):
        build_run(compose_config(*TINY, "controller=lamb", "controller.exclude_1d=false", "trainer.optimizer=adamw",
                                 "trainer.norm_lr_mult=4"), "/tmp/unused-trust-ratio")
