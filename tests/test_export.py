"""export: fewest-knot fits with known answers; replay: round trip, depth mapping, clear errors."""
import csv
import json

import numpy as np
import pytest

from meta_llr.errors import UserError
from meta_llr.export import export_run, fit_layer, fewest_knots, load_schedule, main
from meta_llr.runs import read_run
from meta_llr.train import Run
from baselines.replay import Replay
from tests.conftest import TINY


def test_known_piecewise_linear_trace_recovers_its_knots():
    x = np.arange(201) / 200
    knots, values = [0.0, 0.25, 0.6, 1.0], [1.5, 0.5, 0.5, 2.0]
    y = np.interp(x, knots, values)
    fit = fit_layer(x, y, tol=0.01)
    assert fit["knots"] == pytest.approx(knots) and fit["values"] == pytest.approx(values)
    assert fit["max_error"] < 1e-9


def test_tolerance_trades_knots_for_error():
    x = np.arange(101) / 100
    y = np.cos(np.pi * x)  # range 2
    coarse, fine = fit_layer(x, y, 0.05), fit_layer(x, y, 0.005)
    assert len(coarse["knots"]) < len(fine["knots"])
    for fit, tol in ((coarse, 0.05), (fine, 0.005)):
        assert np.abs(np.interp(x, fit["knots"], fit["values"]) - y).max() <= tol * 2 + 1e-12
        # fewest: with one knot less (knots at trace points, interpolating) the tolerance breaks
        assert len(fewest_knots(x, y, tol * 2)) <= len(fit["knots"])
    # brute force on a short trace: no 2-knot subset fits, the DP's 3 knots do
    xs = np.arange(7) / 6
    ys = np.array([0.0, 1.0, 2.0, 3.0, 2.0, 1.0, 0.0])
    assert fewest_knots(xs, ys, 0.01) == [0, 3, 6]


def test_constant_trace_is_two_equal_knots():
    fit = fit_layer(np.linspace(0, 1, 50), np.full(50, 1.0), 0.02)
    assert fit["values"] == [1.0, 1.0] and fit["max_error"] == 0


def write_trace(path, names, progress, columns):
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "llr.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "progress", "global_lr", *names])
        for i, p in enumerate(progress):
            writer.writerow([i, p, 0.05, *[c[i] for c in columns]])
    (path / "summary.json").write_text(json.dumps({"status": "finished", "controller": "made_up", "steps": len(progress)}))


def test_export_replay_round_trip(tiny_run, tmp_path):
    _, first = tiny_run(name="shape")  # the tiny model's layers and steps
    names, array = read_run(first).trace
    progress = array[:, 1]
    steps = len(progress)
    # a trace with a kink per layer and a noisy wiggle the tolerance should smooth away
    rng = np.random.default_rng(0)
    columns = [np.interp(progress, [0, 0.5, 1], [1.5 - 0.2 * i, 0.5, 1.0 + 0.3 * i]) + 0.001 * rng.standard_normal(steps)
               for i in range(len(names))]
    write_trace(tmp_path / "source", names, progress, columns)
    tol = 0.05
    assert main([str(tmp_path / "source"), "--tol", str(tol), "--out", str(tmp_path / "s.json")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 1000
    schedule = load_schedule(tmp_path / "s.json")
    assert [layer["name"] for layer in schedule["layers"]] == names
    assert schedule["tolerance"] == tol and schedule["controller"] == "made_up"

    summary, replayed = tiny_run("controller=replay", f"controller.schedule={tmp_path / 's.json'}", name="replay")
    assert summary["status"] == "finished"
    _, replay_trace = read_run(replayed).trace
    assert len(replay_trace) == steps
    for index, layer in enumerate(schedule["layers"]):
        exported = np.interp(replay_trace[:, 1], layer["knots"], layer["values"])
        assert replay_trace[:, 3 + index] == pytest.approx(exported, abs=1e-6)
        spread = columns[index].max() - columns[index].min()
        assert np.abs(replay_trace[:, 3 + index] - columns[index]).max() <= tol * spread + 1e-6


def replay_overrides(schedule, *extra):
    return [*TINY, "model.depth=3", "controller=replay", f"controller.schedule={schedule}", *extra]


def test_replay_by_depth_and_mismatch_errors(tmp_path, make_config):
    schedule = Replay.example_options(tmp_path)["schedule"]  # 2 layers: 1.5 -> 0.5 and 0.5 -> 1.5
    run = Run(make_config(*replay_overrides(schedule, "controller.match=depth")), tmp_path / "a")
    depth = np.array([layer.depth for layer in run.layers])
    total = run.plan.total_steps
    p = np.arange(total) / total
    first, last = 1.5 - p, 0.5 + p
    expected = first[:, None] * (1 - depth) + last[:, None] * depth  # linear in depth between them
    table = np.stack([run.controller.scales(step).numpy() for step in range(total)])
    assert len(depth) == 4 and table == pytest.approx(expected, abs=1e-6)

    with pytest.raises(UserError, match="has 2 layers but the model has 4.*match=depth"):
        Run(make_config(*replay_overrides(schedule)), tmp_path / "b")
    with pytest.raises(UserError, match="needs a schedule file"):
        Run(make_config(*TINY, "controller=replay"), tmp_path / "c")
    with pytest.raises(UserError, match="not found"):
        Run(make_config(*replay_overrides(tmp_path / "none.json")), tmp_path / "d")


def test_export_errors_are_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no llr.csv"):
        export_run(tmp_path / "empty")
    with pytest.raises(UserError, match="--tol must be > 0"):
        export_run(tmp_path / "empty", tol=0)
    assert capsys.readouterr().err.count("\n") == 1
