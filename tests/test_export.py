"""export: fewest-knot fits with known answers; curve files (meta_llr.curves); replay: round trip,
depth mapping, clear errors."""
import csv
import json

import numpy as np
import pytest

from meta_llr.errors import UserError
from meta_llr.curves import (FORMAT, check_curve, evaluate, evaluate_all, layer_scales, load_curve, match_layers,
                             new_curve, write_curve)
from meta_llr.export import export_run, fit_layer, fewest_knots, main
from meta_llr.runs import read_run
from meta_llr.run import build_run
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
    assert main([str(tmp_path / "source"), "--tol", str(tol)]) == 0   # default: RUN_DIR/curve.json + curve.png
    assert (tmp_path / "source" / "curve.png").stat().st_size > 1000
    curve = load_curve(tmp_path / "source" / "curve.json")
    assert curve["format"] == FORMAT == "meta_llr.curve/1"
    assert [layer["name"] for layer in curve["layers"]] == names
    assert curve["tolerance"] == tol and curve["controller"] == "made_up"

    summary, replayed = tiny_run("controller=replay", f"controller.curve={tmp_path / 'source' / 'curve.json'}",
                                 name="replay")
    assert summary["status"] == "finished"
    _, replay_trace = read_run(replayed).trace
    assert len(replay_trace) == steps
    for index, layer in enumerate(curve["layers"]):
        exported = np.interp(replay_trace[:, 1], layer["knots"], layer["values"])
        assert replay_trace[:, 3 + index] == pytest.approx(exported, abs=1e-6)
        spread = columns[index].max() - columns[index].min()
        assert np.abs(replay_trace[:, 3 + index] - columns[index]).max() <= tol * spread + 1e-6


def replay_overrides(curve, *extra):
    return [*TINY, "model.depth=3", "controller=replay", f"controller.curve={curve}", *extra]


def test_replay_by_depth_and_mismatch_errors(tmp_path, make_config):
    curve = Replay.example_options(tmp_path)["curve"]  # 2 layers: 1.5 -> 0.5 and 0.5 -> 1.5
    run = build_run(make_config(*replay_overrides(curve, "controller.match=depth")), tmp_path / "a")
    depth = np.array([layer.depth for layer in run.layers])
    total = run.plan.total_steps
    p = np.arange(total) / total
    first, last = 1.5 - p, 0.5 + p
    expected = first[:, None] * (1 - depth) + last[:, None] * depth  # linear in depth between them
    table = np.stack([run.controller.scales(step).numpy() for step in range(total)])
    assert len(depth) == 4 and table == pytest.approx(expected, abs=1e-6)

    with pytest.raises(UserError, match="has 2 layers but the model has 4.*match=depth"):
        build_run(make_config(*replay_overrides(curve)), tmp_path / "b")
    with pytest.raises(UserError, match="needs a curve file: controller.curve=PATH"):
        build_run(make_config(*TINY, "controller=replay"), tmp_path / "c")
    with pytest.raises(UserError, match="not found"):
        build_run(make_config(*replay_overrides(tmp_path / "none.json")), tmp_path / "d")


BAD_CURVES = {  # file name -> content (None: no file; "dir": a folder)
    "missing.json": None,
    "folder.json": "dir",
    "invalid.json": "{not json",
    "binary.json": bytes(range(128, 256)),
    "wrong_keys.json": json.dumps({"format": FORMAT, "curves": []}),
    "wrong_layer_keys.json": json.dumps({"format": FORMAT, "layers": [{"name": "a", "knot": [0.0], "value": [1.0]}]}),
    "nan_value.json": '{"format": "%s", "layers": [{"name": "a", "knots": [0, 1], "values": [1, NaN]}]}' % FORMAT,
    "inf_knot.json": '{"format": "%s", "layers": [{"name": "a", "knots": [0, Infinity], "values": [1, 1]}]}' % FORMAT,
    "two_layers.json": json.dumps(new_curve([{"name": n, "knots": [0.0], "values": [1.0]} for n in ("a", "b")])),
}


@pytest.mark.parametrize("name", sorted(BAD_CURVES))
def test_bad_replay_curve_files_are_one_line(tmp_path, make_config, name):
    path, content = tmp_path / name, BAD_CURVES[name]
    if content == "dir":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(UserError) as e:  # the file is read while composing; the layer count checked at setup
        build_run(make_config(*replay_overrides(path)), tmp_path / "run")
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_export_errors_are_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no llr.csv"):
        export_run(tmp_path / "empty")
    with pytest.raises(UserError, match="--tol must be > 0"):
        export_run(tmp_path / "empty", tol=0)
    assert capsys.readouterr().err.count("\n") == 1


def test_a_refit_keeps_scales_non_negative_and_a_frozen_layers_zero():
    """freezeout's shape (a cosine down to 0 at 70 %, held there): the least-squares refit of the
    knots would undershoot to -0.003; the knots keep the trace's own values instead."""
    x = np.linspace(0, 1, 101)
    y = np.where(x < 0.7, 0.5 * (1 + np.cos(np.pi * x / 0.7)), 0.0)
    fit = fit_layer(x, y, 0.02)
    assert min(fit["values"]) >= 0 and fit["values"][-1] == 0.0


def test_a_diverged_trace_is_refused_in_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"status": "diverged", "steps": 3}))
    (run / "llr.csv").write_text("step,progress,global_lr,a,b\n0,0.0,0.1,1.0,1.0\n1,0.5,0.1,nan,1.0\n")
    assert main([str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "layer a has a non-finite scale from step 1" in err
    (run / "llr.csv").write_text("step,progress,global_lr,a,b\n0,0.0,0.1,1.0,1.0\n1,0.5,0.1,0.5,1.0\n")
    assert main([str(run), "--out", str(tmp_path)]) == 2   # --out a directory: one line too
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: cannot write {tmp_path}")


def test_curve_files_are_checked_and_evaluated(tmp_path):
    layers = [{"name": "a", "depth": 0.0, "knots": [0.0, 0.5], "values": [2.0, 1.0]},
              {"name": "b", "depth": 1.0, "knots": [0.25, 1.0], "values": [0.0, 3.0]}]
    path = write_curve(tmp_path / "sub" / "c.json", new_curve(layers, controller="made_up", tolerance=0.0))
    curve = load_curve(path)
    assert list(curve) == ["format", "controller", "tolerance", "x", "layers"] and curve["layers"] == layers
    # linear between knots, constant outside them
    assert evaluate(curve["layers"][0], [0.0, 0.25, 0.5, 0.9]) == pytest.approx([2.0, 1.5, 1.0, 1.0])
    p = np.array([0.0, 0.625, 1.0])
    table = evaluate_all(curve, p)
    assert table == pytest.approx(np.array([[2.0, 0.0], [1.0, 1.5], [1.0, 3.0]]))
    assert match_layers(curve, ["a", "b"], [0.0, 1.0]) is None
    weights = match_layers(curve, ["x", "y", "z"], [0.0, 0.5, 1.0], match="depth")
    assert weights == pytest.approx(np.array([[1.0, 0.5, 0.0], [0.0, 0.5, 1.0]]))
    assert layer_scales(curve, p, weights)[:, 1] == pytest.approx(table.mean(axis=1))
    with pytest.raises(UserError, match="names layer 1 'b' but the model calls it 'c'.*controller.match=depth"):
        match_layers(curve, ["a", "c"], [0.0, 1.0])
    with pytest.raises(UserError, match="controller.match must be name or depth"):
        match_layers(curve, ["a", "b"], [0.0, 1.0], match="index")

    # files exported before the rename (format meta_llr.schedule/1) read the same
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"format": "meta_llr.schedule/1", "layers": layers}))
    assert load_curve(old)["layers"] == layers

    bad = tmp_path / "bad.json"
    for content, message in [
        ("{", "not readable JSON"),
        ("[1, 2]", "is not a meta_llr curve"),
        (json.dumps({"format": "other/1", "layers": layers}), "is not a meta_llr curve"),
        (json.dumps({"format": FORMAT, "layers": [{"name": "a", "knots": [0.5, 0.0], "values": [1, 1]}]}),
         "layer a needs finite increasing knots"),
        (json.dumps({"format": FORMAT, "layers": [{"name": "a", "knots": [0.0], "values": [1, 2]}]}),
         "layer a needs finite increasing knots and one value per knot"),
        (json.dumps({"format": FORMAT, "layers": [{"name": "a", "knots": [0.0], "values": [-1]}]}),
         "layer a has negative or non-finite values"),
        (json.dumps({"format": FORMAT, "layers": [{"name": "a", "depth": 2, "knots": [0.0], "values": [1]}]}),
         "layer a has depth 2"),
    ]:
        bad.write_text(content)
        with pytest.raises(UserError, match=message):
            load_curve(bad)
    with pytest.raises(UserError, match="not found.*meta_llr.export"):
        load_curve(tmp_path / "none.json")
    with pytest.raises(UserError, match="negative or non-finite"):
        write_curve(tmp_path / "nan.json", new_curve([{"name": "a", "knots": [0.0], "values": [float("nan")]}]))
    assert not (tmp_path / "nan.json").exists()
    assert check_curve(curve) is curve
