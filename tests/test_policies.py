"""Global LR policies: equal to torch's schedulers step for step, and exact at defining points."""
import numpy as np
import pytest
import torch

from meta_llr.errors import UserError
from meta_llr.policies import lr_factors

T = 200
LR = 0.4


def torch_lrs(make_scheduler, steps=T, lr=LR):
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=lr)
    sched = make_scheduler(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return np.array(out)


def test_step_matches_multistep_and_drops_at_50_75_90():
    ours = LR * lr_factors({"name": "step", "milestones": [0.5, 0.75, 0.9], "gamma": 0.1}, T)
    ref = torch_lrs(lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [100, 150, 180], 0.1))
    np.testing.assert_allclose(ours, ref, rtol=1e-12)
    assert ours[99] == pytest.approx(LR) and ours[100] == pytest.approx(LR * 0.1)
    assert ours[149] == pytest.approx(LR * 0.1) and ours[150] == pytest.approx(LR * 0.01)
    assert ours[179] == pytest.approx(LR * 0.01) and ours[180] == pytest.approx(LR * 0.001)


def test_cosine_matches_torch():
    ours = LR * lr_factors({"name": "cosine", "min_factor": 0.1}, T)
    ref = torch_lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=T, eta_min=0.1 * LR))
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("anneal", ["cos", "linear"])
def test_onecycle_matches_torch(anneal):
    ours = LR * lr_factors({"name": "onecycle", "pct_start": 0.3, "div_factor": 25.0,
                            "final_div_factor": 1e4, "anneal": anneal}, T)
    ref = torch_lrs(lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=LR, total_steps=T, pct_start=0.3, anneal_strategy=anneal, cycle_momentum=False))
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-12)
    assert ours.max() == pytest.approx(LR)
    assert ours[-1] == pytest.approx(LR / 25 / 1e4)


def test_triangular_matches_cycliclr():
    ours = LR * lr_factors({"name": "triangular", "cycles": 2, "low": 0.1}, T)
    ref = torch_lrs(lambda o: torch.optim.lr_scheduler.CyclicLR(
        o, base_lr=0.1 * LR, max_lr=LR, step_size_up=50, mode="triangular", cycle_momentum=False))
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-12)
    assert ours[50] == pytest.approx(LR) and ours[100] == pytest.approx(0.1 * LR)


def test_constant_and_warmup():
    f = lr_factors({"name": "constant", "warmup": 0.1}, 100)
    np.testing.assert_allclose(f[:10], np.arange(1, 11) / 10)
    assert (f[10:] == 1).all()


def test_bad_schedule_names_and_options():
    with pytest.raises(UserError, match="unknown schedule 'nope'; valid: constant, cosine"):
        lr_factors({"name": "nope"}, 10)
    with pytest.raises(UserError, match="warmup"):
        lr_factors({"name": "constant", "warmup": 1.5}, 10)
    with pytest.raises(UserError, match="schedule=step"):
        lr_factors({"name": "step", "bogus": 1}, 10)
