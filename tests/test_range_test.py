"""The per-layer LR range test: limits where theory puts them on a separable quadratic, the
snapshot restored exactly, best and limit read from known losses, and the command end to end."""
import math

import torch

from meta_llr.config import compose
from meta_llr.curves import load_curve
from meta_llr.range_test import RangeProbe, main, read_probe, sweep
from meta_llr.run import build_run
from tests.quadratic import Quadratic

OVERRIDES = ["data=synthetic", "data.channels=1", "data.size=8", "data.classes=4", "data.train_size=128",
             "data.test_size=32", "model=mlp", "model.hidden=16", "trainer.batch_size=16", "device=cpu"]


def test_read_probe_on_a_known_loss_curve():
    probe = RangeProbe(0, 0.01, 100.0, 5)  # scales 0.01, 0.1, 1, 10, 100
    assert probe.scale_at(0) == 0.01 and abs(probe.scale_at(2) - 1.0) < 1e-12
    result = read_probe([2.0, 1.0, 0.5, 0.6, 50.0], probe)
    low = min(range(5), key=lambda k: result["smoothed"][k])
    assert result["best"] == probe.scale_at(low)
    assert result["limit"] == probe.scale_at(1)  # the rise into the blow-up began after the step at s_2
    assert read_probe([2.0, 1.0, 0.9], probe)["limit"] == 100.0  # never blew up: the top of the range
    assert read_probe([2.0, 1.0, 0.9], probe, stopped_at=2)["limit"] == probe.scale_at(2)


def test_each_layers_limit_is_two_over_lr_times_its_curvature_and_the_snapshot_is_restored():
    """Plain GD on layer l of curvature h_l is stable for lr·s·h_l < 2: the probe of layer l must
    find its limit at s* = 2/(lr·h_l), within a step of the geometric sweep."""
    lr, low, high, steps = 0.01, 0.1, 1000.0, 200
    ratio = (high / low) ** (1 / (steps - 1))
    for l, h in enumerate((1.0, 10.0, 100.0)):
        model = Quadratic((1.0, 10.0, 100.0)).double()
        with torch.no_grad():  # targets at 0 (no rounding floor near them); only layer l off its
            for k, (p, target) in enumerate(zip(model.params(), model.targets())):  # target: its loss alone
                target.zero_()
                p.fill_(1.0 if k == l else 0.0)
        before = [p.detach().clone() for p in model.params()]
        losses = sweep(model, lambda m, x, y: m.loss(), [(None, None)], [list(layer.params) for layer in model.layers()],
                       lr, low, high, steps)
        assert all(torch.equal(p, q) for p, q in zip(model.params(), before))  # restored exactly
        limit = read_probe(losses[l], RangeProbe(l, low, high, steps))["limit"]
        expected = 2 / (lr * h)
        assert limit < expected <= limit * ratio * (1 + 1e-9), (h, limit, expected)


def test_range_test_end_to_end(tmp_path, capsys):
    out = tmp_path / "rt"
    argv = [*OVERRIDES, "--warmup", "3", "--steps", "16", "--low", "0.01", "--high", "1000", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "3 warm-up steps, then 4 probes x 16 steps = 67 steps in all" in printed
    table = (out / "range_test.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| probe")]
    assert [r.split("|")[1].strip() for r in rows] == ["hidden.0", "hidden.1", "head", "all layers"]
    for r in rows:
        best, limit = float(r.split("|")[2]), float(r.split("|")[3])
        assert 0.01 <= best <= 1000 and 0.01 <= limit <= 1000
    assert "controller=depth_linear controller.first=" in table and "controller=fixed_linear" in table
    lines = (out / "range_test.csv").read_text().splitlines()
    assert lines[0] == "probe,step,scale,loss" and len(lines) > 1 + 4
    assert all(math.isfinite(float(line.split(",")[2])) for line in lines[1:])
    curve = load_curve(out / "curve.json")
    assert [layer["name"] for layer in curve["layers"]] == ["hidden.0", "hidden.1", "head"]
    replay = build_run(compose([*OVERRIDES, "controller=replay", f"controller.curve={out / 'curve.json'}",
                                "trainer.epochs=1", "quiet=true", "trainer.checkpoint=false"]), tmp_path / "replay")
    replay.close()
    assert main([*OVERRIDES, "--low", "5", "--high", "1", "--out", str(tmp_path / "bad")]) == 2
