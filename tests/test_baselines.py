"""The hand-crafted curves: known values at start, breakpoints and end; the real loop
freezes what they freeze; the run's llr.csv is the formula; the plots render."""
import csv
import inspect
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from meta_llr.errors import UserError
from meta_llr.registry import available, build_controller
from meta_llr.plot_schedules import main as plot_main
from meta_llr.plot_schedules import curve_table, plot_all, stub_setup
from meta_llr.run import build_run
from tests.conftest import TINY, compose_config

f32 = np.float32


def build(name, **options):
    return build_controller({"name": name, **options})


def at(name, num_layers, progress, **options):
    """curve() at the given fractions of training: [len(progress), num_layers]."""
    depth = np.arange(num_layers) / max(num_layers - 1, 1)
    return build(name, **options).curve(np.asarray(progress, dtype=np.float64), depth)


def composed(name):
    """``controller=name`` as the CLI composes it (presets included)."""
    return OmegaConf.to_container(compose_config(f"controller={name}").controller)


OWNED = ["depth_linear", "fixed_linear", "discriminative", "llrd", "freezeout", "unfreeze", "cascade_onecycle",
         "depth_cyclic", "soft_freeze"]


@pytest.mark.parametrize("name", OWNED)
def test_config_lists_every_option_with_its_default(name):
    """The typed config is derived from __init__: defaults are written once, in the signature."""
    config = composed(name)
    assert config.pop("name") == name
    signature = inspect.signature(available()[name].__init__)
    defaults = {k: p.default for k, p in signature.parameters.items() if k != "self"}
    assert config == {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}


# ----------------------------------------------------------------------------- known values

def test_depth_linear():
    assert np.allclose(at("depth_linear", 3, [0, 0.5, 1]), [[1.5, 1.0, 0.5]] * 3)
    assert np.allclose(at("depth_linear", 10, [0, 1])[:, [0, 3, 9]], [[1.5, 1.5 - 1 / 3, 0.5]] * 2)
    assert np.allclose(at("depth_linear", 3, [0], first=0.5, last=1.5), [[0.5, 1.0, 1.5]])


def test_fixed_linear_defaults():
    assert np.allclose(at("fixed_linear", 3, [0, 0.5, 1]), [[1.5, 1, 0.5], [1, 1, 1], [0.5, 1, 1.5]])
    ten = at("fixed_linear", 10, [0, 0.25, 1])
    assert np.allclose(ten[:, 0], [1.5, 1.25, 0.5]) and np.allclose(ten[:, 9], [0.5, 0.75, 1.5])
    start, end = 1.5 - 1 / 3, 0.5 + 1 / 3  # layer 3 of 10: depth 1/3
    assert np.allclose(ten[:, 3], [start, start + 0.25 * (end - start), end])


def test_fixed_linear_windows_hold_outside_and_jump_when_empty():
    values = at("fixed_linear", 3, [0, 0.2, 0.4, 0.6, 0.8, 1.0], start=[1.0], end=[2.0], t0=[0.2, 0.4],
                t1=[0.6, 0.8])  # windows [0.2, 0.6], [0.3, 0.7], [0.4, 0.8]
    assert np.allclose(values[:, 0], [1, 1, 1.5, 2, 2, 2])
    assert np.allclose(values[:, 1], [1, 1, 1.25, 1.75, 2, 2])
    assert np.allclose(values[:, 2], [1, 1, 1, 1.5, 2, 2])
    jump = at("fixed_linear", 1, [0.0, 0.49, 0.5, 0.9], start=[3.0], end=[1.0], t0=[0.5], t1=[0.5])
    assert jump[:, 0].tolist() == [3.0, 3.0, 1.0, 1.0]


def test_the_discussions_three_layer_example_is_exact():
    """3 layers, 100 epochs: layer 1 2.0 -> 0.5 over epochs 0-10, layer 2 1.0, layer 3 0.5 -> 2.0 over 100."""
    epochs = [0, 5, 10, 50, 100]
    expected = f32([[2.0, 1.0, 0.5], [1.25, 1.0, 0.575], [0.5, 1.0, 0.65], [0.5, 1.0, 1.25], [0.5, 1.0, 2.0]])
    config = composed("fixed_linear_discussion")
    assert config["name"] == "fixed_linear"
    controller = build_controller(config)
    assert controller.required_layers() == 3
    curve = controller.curve(np.array(epochs) / 100, np.array([0.0, 0.5, 1.0])).astype(np.float32)
    assert np.array_equal(curve, expected)
    # The device table of a real 100-epoch plan, at the first step of each epoch.
    table = curve_table(controller, 3, epochs=100, steps_per_epoch=7)
    assert np.array_equal(table[[7 * e for e in epochs[:-1]]], expected[:-1])


def test_per_layer_lists_must_fit_the_layer_count():
    controller = build("fixed_linear", start=[2.0, 1.0, 0.5, 0.1])
    with pytest.raises(UserError, match=r"controller.start has 4 values but the model has 3 layers.*layers.groups=4"):
        stub_setup(controller, 3)
    with pytest.raises(UserError, match="t0=0.9 > t1=0.5"):
        stub_setup(build("fixed_linear", t0=[0.9], t1=[0.5]), 3)
    with pytest.raises(UserError, match="nothing would train"):
        stub_setup(build("depth_linear", first=0.0, last=0.0), 3)
    with pytest.raises(UserError, match="must be finite and >= 0"):
        build("fixed_linear", end=[-1.0])
    with pytest.raises(UserError, match=r"must lie in \[0, 1\]"):
        build("fixed_linear", t1=[1.5])


def test_discriminative_and_llrd():
    assert np.allclose(at("discriminative", 3, [0, 1]), [[1 / 2.6 ** 2, 1 / 2.6, 1]] * 2)
    ten = at("discriminative", 10, [0.5])[0]
    assert np.allclose(ten, 2.6 ** -np.arange(9, -1, -1.0)) and ten[-1] == 1.0
    assert np.allclose(at("llrd", 3, [0, 1]), [[0.64, 0.8, 1.0]] * 2)
    assert np.allclose(at("llrd", 10, [0.3], decay=0.9)[0], 0.9 ** np.arange(9, -1, -1.0))
    with pytest.raises(UserError, match="decay must be in"):
        build("llrd", decay=1.5)


def paper_freezeout(p, t, initial):
    """Brock et al.: alpha_i(t) = alpha_i(0) / 2 * (1 + cos(pi t / t_i)) before t_i, then 0."""
    return np.where(p < t, 0.5 * initial * (1 + np.cos(np.pi * p / t)), 0.0)


def test_freezeout_linear_breakpoints():
    # t_l = 0.5, 0.75, 1.0: half way down at t_l / 2, zero from t_l on.
    values = at("freezeout", 3, [0, 0.25, 0.375, 0.5, 0.75, 1.0])
    assert np.allclose(values, [[1, 1, 1], [0.5, 0.5 * (1 + math.cos(math.pi / 3)), 0.5 * (1 + math.cos(math.pi / 4))],
                                [0.5 * (1 + math.cos(0.75 * math.pi)), 0.5, paper_freezeout(0.375, 1.0, 1.0)],
                                [0, 0.25, 0.5], [0, 0, 0.5 * (1 + math.cos(0.75 * math.pi))], [0, 0, 0]])
    ten = build("freezeout")
    assert np.allclose(ten.freeze_points(np.arange(10) / 9), 0.5 + 0.5 * np.arange(10) / 9)


def test_freezeout_cubic_scaled_is_the_papers_rule():
    # The paper's t0 = 0.8 (cubed after interpolation, 0.512 for the first layer), scaled LRs.
    p = np.linspace(0, 1, 201)
    for num_layers in (3, 10):
        depth = np.arange(num_layers) / (num_layers - 1)
        t = (0.8 + 0.2 * depth) ** 3
        values = at("freezeout", num_layers, p, t0=0.512, spacing="cubic", scale_lr=True)
        assert np.allclose(values, paper_freezeout(p[:, None], t, 1 / t), atol=1e-12)
    assert np.allclose(build("freezeout", t0=0.512, spacing="cubic").freeze_points(np.array([0, 0.5, 1])),
                       [0.512, 0.729, 1.0])


def test_freezeout_freezes_exactly_from_t_l():
    controller = build("freezeout")
    stub_setup(controller, 3, epochs=10, steps_per_epoch=100)
    assert controller.frozen_at == [500, 750, None] and controller.trains_from == [None] * 3
    assert controller.trainable(0) == [True] * 3 and controller.trainable(499) == [True] * 3
    assert controller.trainable(500) == [False, True, True] and controller.trainable(749) == [False, True, True]
    assert controller.trainable(750) == [False, False, True] and controller.trainable(999) == [False, False, True]
    assert controller.scales(499)[0] > 0 and controller.scales(500)[0] == 0
    rows = controller.records()["freezing"]
    assert [r["frozen_from_step"] for r in rows] == [500, 750, None]


@pytest.mark.parametrize("direction,masks", [
    ("last_to_first", {0: [0, 0, 1], 1: [0, 0, 1], 2: [0, 1, 1], 3: [0, 1, 1], 4: [1, 1, 1], 9: [1, 1, 1]}),
    ("first_to_last", {0: [1, 0, 0], 1: [1, 0, 0], 2: [1, 1, 0], 3: [1, 1, 0], 4: [1, 1, 1], 9: [1, 1, 1]}),
])
def test_unfreeze_stages(direction, masks):
    controller = build("unfreeze", every=2, direction=direction)
    stub_setup(controller, 3, epochs=10, steps_per_epoch=3)
    for epoch, mask in masks.items():
        for step in range(3 * epoch, 3 * epoch + 3):
            assert controller.trainable(step) == [bool(m) for m in mask], (epoch, step)
            assert controller.scales(step).tolist() == mask
    ten = build("unfreeze")
    stub_setup(ten, 10, epochs=12, steps_per_epoch=5)
    for epoch in range(12):
        assert sum(ten.trainable(5 * epoch)) == min(10, 1 + epoch) == sum(ten.trainable(5 * epoch + 4))
    assert ten.trains_from == [5 * (9 - i) if i < 9 else None for i in range(10)]


def test_cascade_onecycle():
    three = at("cascade_onecycle", 3, [0, 0.1, 0.2, 0.4, 0.6, 1.0])  # peaks at 0.2, 0.4, 0.6
    assert np.allclose(three[0], 0.1) and np.allclose(three[-1], 0.001)
    assert np.allclose(np.diag(three[2:5]), 1.0)
    assert np.isclose(three[1, 0], 0.55)                                # half way up
    assert np.isclose(three[4, 0], 0.001 + 0.999 * 0.5)                 # half way down (0.6 of [0.2, 1])
    linear = at("cascade_onecycle", 3, [0.05, 0.6], anneal="linear")
    assert np.isclose(linear[0, 0], 0.1 + 0.9 * 0.25) and np.isclose(linear[1, 0], 0.5005)
    # The discussion's example: 5 groups over 50 epochs peak at epochs 10, 15, 20, 25, 30.
    table = curve_table(build("cascade_onecycle"), 5, epochs=50, steps_per_epoch=1)
    assert table.argmax(axis=0).tolist() == [10, 15, 20, 25, 30] and np.allclose(table.max(axis=0), 1.0)
    peaks = 0.2 + 0.4 * np.arange(10) / 9
    assert np.allclose(np.diag(at("cascade_onecycle", 10, peaks)), 1.0)
    assert np.allclose(at("cascade_onecycle", 10, [0.0, 1.0]), [[0.1] * 10, [0.001] * 10])


def test_depth_cyclic():
    controller = build("depth_cyclic")
    assert controller.cycles(np.arange(3) / 2).tolist() == [8, 5, 1]
    assert controller.cycles(np.arange(10) / 9).tolist() == [8, 7, 6, 6, 5, 4, 3, 3, 2, 1]
    three = at("depth_cyclic", 3, [0, 1 / 16, 1 / 8, 0.1, 0.5, 1.0])
    assert np.allclose(three[:, 0], [0.5, 1.5, 0.5, 0.5 + 1.0 * 0.4, 0.5, 0.5])
    assert np.allclose(three[:, 2], [0.5, 0.625, 0.75, 0.7, 1.5, 0.5])
    assert np.allclose(at("depth_cyclic", 3, [0.5, 1 / 16], short_first=False)[:, [0, 2]], [[1.5, 0.5], [0.625, 1.5]])
    cycles = controller.cycles(np.arange(10) / 9)
    first_peaks = np.diag(at("depth_cyclic", 10, 0.5 / cycles))
    last_peaks = np.diag(at("depth_cyclic", 10, 1 - 0.5 / cycles))
    assert np.allclose(first_peaks, 1.5) and np.allclose(last_peaks, 1.5)
    assert np.allclose(at("depth_cyclic", 10, [0.0, 1.0]), 0.5)


def test_soft_freeze():
    three = at("soft_freeze", 3, [0, 0.1, 0.2, 1.0])  # half-lives 0.1, 0.15, 0.2
    assert np.allclose(three[0], [1.5, 0.8, 0.1])
    assert np.allclose(three[:, 1], 0.8)                               # the middle layer mixes to a constant
    assert np.isclose(three[1, 0], 0.8) and np.isclose(three[2, 2], 0.8)  # one half-life each
    assert np.allclose(three[3], [0.1 + 1.4 * 2 ** -10, 0.8, 0.1 + 1.4 * (1 - 2 ** -5)])
    ten = at("soft_freeze", 10, [0, 1e9])
    assert np.allclose(ten[0], 1.5 - 1.4 * np.arange(10) / 9) and np.allclose(ten[1], 0.1 + 1.4 * np.arange(10) / 9)


# ----------------------------------------------------------------------------- the real loop

def train_steps(run, epochs):
    """Step the loop by hand; per step, the weights after it and which params had a gradient."""
    had_grad, weights, masks = [], [], []
    step_optimizer = run.flat_step.step

    def step_and_record(*args, **kwargs):
        had_grad.append([[p.grad is not None for p in layer.params] for layer in run.layers])
        return step_optimizer(*args, **kwargs)

    run.flat_step.step = step_and_record
    for _ in range(epochs):
        for x, y in run.batches():
            run.train_step(x, y)
            masks.append(list(run.trainable))
            weights.append([[p.detach().clone() for p in layer.params] for layer in run.layers])
    return had_grad, weights, masks


def test_freezeout_in_the_loop_stops_gradients_and_leaves_frozen_weights_bitwise_unchanged(tmp_path):
    run = build_run(compose_config(*TINY, "controller=freezeout", "controller.t0=0.25", "trainer.epochs=4"), tmp_path)
    assert len(run.layers) == 3 and run.plan.total_steps == 16
    frozen_at = run.controller.frozen_at  # t_l = 0.25, 0.625, 1.0 of 16 steps
    assert frozen_at == [4, 10, None]
    had_grad, weights, masks = train_steps(run, 4)
    for step in range(16):
        for layer in range(3):
            frozen = frozen_at[layer] is not None and step >= frozen_at[layer]
            assert masks[step][layer] == (not frozen)
            assert all(has == (not frozen) for has in had_grad[step][layer]), (step, layer)
            if frozen:
                assert all(not p.requires_grad for p in run.layers[layer].params)
                before = weights[frozen_at[layer] - 1][layer]
                assert all(torch.equal(a, b) for a, b in zip(weights[step][layer], before)), (step, layer)
    assert not all(torch.equal(a, b) for a, b in zip(weights[0][0], weights[3][0]))  # it trained before t_0


def test_unfreeze_in_the_loop_trains_the_expected_layers(tmp_path):
    run = build_run(compose_config(*TINY, "controller=unfreeze", "controller.direction=first_to_last",
                             "trainer.epochs=4"), tmp_path)
    had_grad, weights, masks = train_steps(run, 4)
    for step in range(16):
        epoch = step // 4
        expected = [layer < 1 + epoch for layer in range(3)]
        assert masks[step] == expected
        assert [all(g) for g in had_grad[step]] == expected and [any(g) for g in had_grad[step]] == expected
    # The last layer sits out epochs 0 and 1: its weights do not move until step 8.
    assert all(torch.equal(a, b) for a, b in zip(weights[0][2], weights[7][2]))
    assert not all(torch.equal(a, b) for a, b in zip(weights[7][2], weights[8][2]))


@pytest.mark.parametrize("name,overrides", [
    ("freezeout", ["controller.t0=0.3", "controller.spacing=cubic", "controller.scale_lr=true"]),
    ("fixed_linear_discussion", []),
    ("soft_freeze", ["schedule=cosine"]),
])
def test_llr_csv_is_the_formula_at_every_row(tmp_run_dir_factory, name, overrides):
    from meta_llr.run import train

    cfg = compose_config(*TINY, f"controller={name}", "trainer.trace_every=1", *overrides)
    out = tmp_run_dir_factory()
    summary = train(cfg, out)
    assert summary["status"] == "finished"
    with open(out / "llr.csv") as handle:
        rows = list(csv.reader(handle))
    header, rows = rows[0], rows[1:]
    total = summary["steps"]
    assert [int(r[0]) for r in rows] == list(range(total))
    controller = build_controller(OmegaConf.to_container(cfg.controller))
    expected = controller.curve(np.arange(total) / total, np.array([0.0, 0.5, 1.0])).astype(np.float32)
    logged = np.array([[float(v) for v in r[3:]] for r in rows], dtype=np.float32)
    assert logged.shape == expected.shape and np.array_equal(logged, expected)
    if name == "freezeout":  # and the run records when each layer froze
        with open(out / "freezing.csv") as handle:
            frozen = [row["frozen_from_step"] for row in csv.DictReader(handle)]
        zero = (expected == 0)
        assert frozen == [str(int(np.argmax(zero[:, 0]))), str(int(np.argmax(zero[:, 1]))), ""]


@pytest.fixture
def tmp_run_dir_factory(tmp_path):
    count = iter(range(100))
    return lambda: tmp_path / f"run{next(count)}"


# ----------------------------------------------------------------------------- plots

def test_plot_tool_writes_one_png_per_baseline_and_the_page(tmp_path):
    written = plot_all(tmp_path, num_layers=10, epochs=10, only=["freezeout", "fixed_linear_discussion"])
    assert sorted(p.relative_to(tmp_path).as_posix() for p in written) == [
        "schedules.png", "schedules/fixed_linear_discussion.png", "schedules/freezeout.png"]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_plot_tool_rejects_unknown_names(capsys):
    with pytest.raises(SystemExit) as exit_info:
        plot_main(["--only", "nonsense", "--out", "/nonexistent"])
    assert exit_info.value.code == 2
    assert "no baseline config nonsense" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        plot_main(["--only", "hessian_secant", "--out", "/nonexistent"])
    assert exit_info.value.code == 2
    assert "not a stats-free baseline: hessian_secant" in capsys.readouterr().err
