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
