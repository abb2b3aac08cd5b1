"""The per-layer LR range test: one probe per layer and one for all, best and limit scales
read from the loss, a replayable curve, and a rerun that reuses the probes."""
import json

from meta_llr.config import compose
from meta_llr.curves import load_curve
from meta_llr.range_test import RangeProbe, main, read_probe
from meta_llr.run import build_run

OVERRIDES = ["data=synthetic", "data.channels=1", "data.size=8", "data.classes=4", "data.train_size=128",
             "data.test_size=32", "model=mlp", "model.hidden=16", "trainer.batch_size=16", "device=cpu"]


def test_read_probe_on_a_known_loss_curve():
    probe = RangeProbe(0, 0.01, 100.0, 5)  # scales 0.01, 0.1, 1, 10, 100
    losses = [2.0, 1.0, 0.5, 0.5, 50.0]
    result = read_probe(losses, probe, None)
    smoothed = result["smoothed"]
    assert probe.scale_at(0) == 0.01 and abs(probe.scale_at(2) - 1.0) < 1e-12
    low = min(range(5), key=lambda k: smoothed[k])
    assert result["best"] == probe.scale_at(low) and result["limit"] == 100.0  # the blow-up at the last step
    assert read_probe([2.0, 1.0, 0.9], probe, 2)["limit"] == probe.scale_at(2)  # diverged there


def test_range_test_end_to_end(tmp_path, capsys):
    out = tmp_path / "rt"
    argv = [*OVERRIDES, "--steps", "16", "--low", "0.01", "--high", "1000", "--out", str(out)]
    assert main(argv) == 0
    table = (out / "range_test.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| probe")]
    assert [r.split("|")[1].strip() for r in rows] == ["hidden.0", "hidden.1", "head", "all layers"]
    for r in rows:
        best, limit = float(r.split("|")[2]), float(r.split("|")[3])
        assert 0.01 <= best <= limit <= 1000
    assert json.loads((out / "all_layers" / "summary.json").read_text())["status"] == "diverged"  # x1000 blows up
    curve = load_curve(out / "curve.json")
    assert [layer["name"] for layer in curve["layers"]] == ["hidden.0", "hidden.1", "head"]
    replay = build_run(compose([*OVERRIDES, "controller=replay", f"controller.curve={out / 'curve.json'}",
                                "trainer.epochs=1", "quiet=true", "trainer.checkpoint=false"]), tmp_path / "replay")
    replay.close()
    mtime = (out / "head" / "summary.json").stat().st_mtime_ns
    assert main(argv) == 0 and (out / "range_test.md").read_text() == table  # probes reused, same table
    assert (out / "head" / "summary.json").stat().st_mtime_ns == mtime
    assert main([*OVERRIDES, "--low", "5", "--high", "1", "--out", str(tmp_path / "bad")]) == 2
