"""The controller health table (python -m meta_llr.health): the table from the runs' summaries,
the rule's verdicts, and a setting whose runs are elsewhere kept from the previous table."""
import json

import yaml

from meta_llr.health import main

PLAN = {"name": "health", "baseline": "uniform", "max_drop": 0.02,
        "settings": {"a": {"description": "setting a", "overrides": [], "seeds": [0, 1]},
                     "b": {"description": "setting b", "overrides": [], "seeds": [0]}}}


def summary(runs, setting, controller, seed, acc, status="finished"):
    out = runs / "health" / setting / f"{controller}-s{seed}"
    out.mkdir(parents=True)
    (out / "summary.json").write_text(json.dumps({"status": status, "final_test_acc": acc, "wall_s": 1.0, "steps": 10}))


def test_table_rule_and_kept_sections(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump(PLAN))
    runs = tmp_path / "runs"
    for seed, acc in enumerate((0.90, 0.92)):
        summary(runs, "a", "uniform", seed, acc)
        summary(runs, "a", "depth_linear", seed, acc - 0.05)  # 5 points below: fails the rule
    out = tmp_path / "health.md"
    previous = "# old\n\n## b\n\nsetting b\n\nSeeds per controller: 1 (planned 1).\n\n| controller | runs |\n|---|---|\n| `uniform` | 1 |\n"
    out.write_text(previous)
    args = ["--plan", str(plan), "--runs", str(runs), "--out", str(out), "--report-only",
            "--controllers", "uniform,depth_linear"]
    assert main([*args, "--settings", "a"]) == 0
    text = out.read_text()
    a, b = text.split("## a")[1].split("## b")
    assert "| `uniform` | 2 | 0.9100 ± 0.0141 |" in a and "| `depth_linear` | 2 |" in a and "FAILS" in a
    assert "Kept from the previous table" in b and "| `uniform` | 1 |" in b and b.count("setting b") == 1
    assert main([*args, "--settings", "a"]) == 0  # kept again, not stacked
    assert out.read_text().count("Kept from the previous table") == 1


def test_a_killed_or_interrupted_run_is_trained_again_and_a_bad_plan_is_one_line(tmp_path, capsys):
    tiny = ["data=synthetic", "data.channels=1", "data.size=8", "data.classes=4", "data.train_size=64",
            "data.test_size=32", "model=mlp", "model.hidden=16", "trainer.epochs=1", "trainer.batch_size=16"]
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump(dict(PLAN, settings={"a": {"description": "a", "overrides": tiny, "seeds": [0, 1]}})))
    runs = tmp_path / "runs"
    summary(runs, "a", "uniform", 0, 0.5, status="interrupted")
    summary(runs, "a", "uniform", 1, 0.25, status="finished")   # over: kept as it is
    assert main(["--plan", str(plan), "--runs", str(runs), "--out", str(tmp_path / "h.md"),
                 "--controllers", "uniform"]) == 0
    again = json.loads((runs / "health" / "a" / "uniform-s0" / "summary.json").read_text())
    assert again["status"] == "finished" and again["steps"] == 4
    assert json.loads((runs / "health" / "a" / "uniform-s1" / "summary.json").read_text())["final_test_acc"] == 0.25
    capsys.readouterr()
    for bad in (tmp_path / "missing.yaml", tmp_path / "h.md"):
        assert main(["--plan", str(bad), "--report-only"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --plan") and err.count("\n") == 1
