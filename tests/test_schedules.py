"""Global LR schedules: equal to torch's schedulers step for step, exact at defining points, and
typed options (defaults in range, each bad value a one-line UserError naming the option)."""
import re

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from meta_llr.errors import UserError
from meta_llr.options import check_section
from meta_llr.schedules import (SCHEDULES, ConstantConfig, CosineConfig, OneCycleConfig, ScheduleConfig,
                                StepConfig, TriangularConfig, lr_factors)

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
    with pytest.raises(UserError, match="schedule=step has no option bogus; its options: warmup, milestones, gamma"):
        lr_factors({"name": "step", "bogus": 1}, 10)
    with pytest.raises(UserError, match=r"schedule\.gamma=abc has the wrong type"):
        lr_factors({"name": "step", "gamma": "abc"}, 10)


def test_every_schedule_has_a_typed_config_with_todays_defaults():
    assert SCHEDULES == {"constant": ConstantConfig, "step": StepConfig, "triangular": TriangularConfig,
                         "onecycle": OneCycleConfig, "cosine": CosineConfig}
    for name, config in SCHEDULES.items():
        assert issubclass(config, ScheduleConfig) and config.section == "schedule"
        defaults = config()
        assert defaults.name == name and defaults.warmup == 0.0
        check_section(defaults)                        # the defaults are in range
        check_section(OmegaConf.structured(config))    # as the composed config node
    assert StepConfig().milestones == [0.5, 0.75, 0.9] and StepConfig().gamma == 0.1
    assert (TriangularConfig().cycles, TriangularConfig().low) == (2.0, 0.1)
    one = OneCycleConfig()
    assert (one.pct_start, one.div_factor, one.final_div_factor, one.anneal) == (0.3, 25.0, 1e4, "cos")
    assert CosineConfig().min_factor == 0.0
    assert StepConfig().milestones is not StepConfig().milestones  # a list per instance


@pytest.mark.parametrize("name, key, value", [
    ("step", "gamma", -1), ("triangular", "low", -1), ("cosine", "min_factor", -1),
    ("onecycle", "div_factor", 0), ("step", "milestones", [1.5]), ("constant", "warmup", 1),
    ("step", "milestones", [0.75, 0.5]), ("onecycle", "anneal", "cosine"), ("onecycle", "pct_start", 1.0),
    ("triangular", "cycles", 0), ("onecycle", "final_div_factor", float("inf")),
])
def test_out_of_range_options_name_the_key(name, key, value):
    shown = re.escape(str(value).replace(" ", ""))  # floats may show as -1.0 after OmegaConf
    config = SCHEDULES[name](**{key: value})
    with pytest.raises(UserError, match=rf"^schedule\.{key}={shown}.*out of range; allowed: "):
        check_section(config)
    for node in ({"name": name, key: value}, OmegaConf.create({"name": name, key: value}), config):
        with pytest.raises(UserError, match=rf"^schedule\.{key}={shown}"):
            lr_factors(node, 100)


def test_lr_factors_takes_a_dataclass_or_a_dictconfig_alike():
    expected = lr_factors({"name": "step", "milestones": [0.5, 0.75, 0.9], "gamma": 0.1}, T)
    np.testing.assert_array_equal(lr_factors(StepConfig(), T), expected)
    np.testing.assert_array_equal(lr_factors(OmegaConf.structured(StepConfig), T), expected)
    np.testing.assert_array_equal(lr_factors(OmegaConf.create({"name": "step", "milestones": [0.5, 0.75, 0.9],
                                                               "gamma": 0.1, "warmup": 0.0}), T), expected)
