"""study: file checks, the launch commands, and verdicts on run directories with known numbers."""
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

from meta_llr.compare import loss_auc
from meta_llr.errors import UserError
from meta_llr.stats import holm, seeds_needed, tost_power, welch_interval
from meta_llr.study import load_study, main, report_study, run_study
from tests.test_compare import make_run

STUDY = {
    "name": "known",
    "grid": {"model": "shallow", "data": "digits", "epochs": 3, "schedule": "step", "seeds": [0, 1, 2, 3],
             "controllers": [{"name": "uniform"},
                             {"label": "fast", "name": "depth_linear", "overrides": {"controller.first": 1.5}},
                             {"label": "slow", "name": "depth_linear", "overrides": {"controller.first": 0.5}}]},
    "baseline": "uniform",
    "hypotheses": [
        {"id": "H_fast", "claim": "fast trains faster", "metric": "loss_auc", "comparison": "fast < uniform"},
        {"id": "H_wrong", "claim": "slow trains faster", "metric": "loss_auc", "comparison": "slow < uniform"},
        {"id": "H_same", "claim": "same accuracy", "metric": "final_test_acc",
         "comparison": "|fast - uniform| < 0.05"},
        {"id": "H_tight", "claim": "same accuracy, tight margin", "metric": "final_test_acc",
         "comparison": "|slow - uniform| < 0.001", "alpha": 0.01},
    ],
}
# final train loss per arm and seed: fast clearly lowest, slow clearly highest
LAST_LOSS = {"uniform": [0.30, 0.32, 0.31, 0.29], "fast": [0.20, 0.22, 0.21, 0.19], "slow": [0.40, 0.43, 0.41, 0.42]}
FINAL_ACC = {"uniform": [0.900, 0.905, 0.902, 0.899], "fast": [0.901, 0.903, 0.900, 0.904],
             "slow": [0.890, 0.906, 0.880, 0.912]}


@pytest.fixture
def study_file(tmp_path):
    path = tmp_path / "known.yaml"
    path.write_text(yaml.safe_dump(STUDY))
    return path


def fill_runs(root):
    for arm, losses in LAST_LOSS.items():
        controller = "uniform" if arm == "uniform" else "depth_linear"
        for seed, (last, acc) in enumerate(zip(losses, FINAL_ACC[arm])):
            make_run(root / "known", f"{arm}-s{seed}", controller, seed, accs=(0.6, 0.8, acc),
                     losses=(1.0, 0.5, last), arm=arm)


def test_shipped_studies_load():
    first = load_study("discussion_first")
    assert list(first["arms"]) == ["uniform", "depth_linear", "reversed", "fixed_linear"]
    assert first["arms"]["reversed"] == {"name": "depth_linear", "seeds": [0, 1, 2, 3, 4],
                                         "overrides": ["controller.first=0.5", "controller.last=1.5"]}
    assert first["grid"]["schedule"] == "step" and first["grid"]["data"] == "imagefolder"
    assert {h.kind for h in first["hypotheses"]} == {"equiv", "<", ">"}
    powered = load_study("powered_first")  # preregistered with effects: every test has a power
    assert len(powered["grid"]["seeds"]) == 18 and all(h.effect for h in powered["hypotheses"])
    assert seeds_needed(0.005, 0.005, equivalence=True) == 18
    look = load_study("first_look")  # the powered study: its files ship beside it
    assert look["arms"]["uniform"]["seeds"] == list(range(12)) and look["arms"]["rnn_meta"]["seeds"] == [0, 1, 2, 3]
    assert all(h.effect for h in look["hypotheses"])
    for arm, key in (("replay", "controller.curve="), ("rnn_meta", "controller.weights=")):
        path = next(o for o in look["arms"][arm]["overrides"] if o.startswith(key)).split("=", 1)[1]
        assert (Path(__file__).parents[1] / path).is_file(), path
    smoke = load_study("digits_smoke")
    assert len(smoke["arms"]) == 3 and smoke["grid"]["seeds"] == [0, 1]


def test_bad_study_files_are_one_line_errors(tmp_path):
    bad = dict(STUDY, hypotheses=[{"id": "X", "comparison": "fast >> uniform"}])
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(UserError, match="must read 'A < B'"):
        load_study(str(tmp_path / "a.yaml"))
    bad = dict(STUDY, hypotheses=[{"id": "X", "comparison": "nope < uniform"}])
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(UserError, match="names arm nope"):
        load_study(str(tmp_path / "b.yaml"))
    with pytest.raises(UserError, match="not found"):
        load_study("no_such_study")
    wrong_types = [  # a value of the wrong type is a line naming it, not a TypeError
        (dict(STUDY, grid=dict(STUDY["grid"], controllers=[{"name": "uniform", "overrides": 5}])), "overrides"),
        (dict(STUDY, grid=dict(STUDY["grid"], seeds=["a"])), "grid.seeds"),
        (dict(STUDY, grid=dict(STUDY["grid"], controllers=[5])), "grid.controllers"),
        (dict(STUDY, hypotheses=[5]), "hypotheses"),
        (dict(STUDY, hypotheses=[{"id": "X", "comparison": "fast > uniform", "alpha": "x"}]), "alpha"),
    ]
    for i, (study, key) in enumerate(wrong_types):
        (tmp_path / f"t{i}.yaml").write_text(yaml.safe_dump(study))
        with pytest.raises(UserError, match=key):
            load_study(str(tmp_path / f"t{i}.yaml"))


def test_run_commands_are_one_multirun_per_arm_and_skip_finished(study_file, tmp_path, capsys):
    study = load_study(str(study_file))
    make_run(tmp_path / "known", "fast-s1", "depth_linear", 1, arm="fast")  # already done
    commands = run_study(study, root=tmp_path, launcher="joblib", extra=["device=cpu"], dry_run=True)
    assert len(commands) == 3
    fast = commands[1]
    assert fast[2:5] == ["meta_llr.train", "-m", "+arm=fast"]
    assert "controller=depth_linear" in fast and "controller.first=1.5" in fast
    assert "seed=0,2,3" in fast and "seed=0,1,2,3" in commands[0]
    assert "hydra/launcher=joblib" in fast and fast[-1] == "device=cpu"
    assert f"hydra.sweep.dir={tmp_path / 'known'}" in fast
    assert "python -m meta_llr.train -m +arm=uniform" in capsys.readouterr().out


def test_run_with_replicas_is_one_job_per_range_of_missing_seeds(study_file, tmp_path):
    study = load_study(str(study_file))
    make_run(tmp_path / "known", "fast-s1", "depth_linear", 1, arm="fast")  # already done
    commands = run_study(study, root=tmp_path, extra=["device=cpu"], dry_run=True, replicas=True)
    fast = [c for c in commands if "+arm=fast" in c]
    assert [[a for a in c if a.startswith(("seed=", "replicas="))] for c in fast] == [["seed=0"], ["seed=2", "replicas=2"]]
    assert "hydra.sweep.subdir=${arm}-s${seed}-r2" in fast[1]
    uniform = [c for c in commands if "+arm=uniform" in c]
    assert len(uniform) == 1 and "seed=0" in uniform[0] and "replicas=4" in uniform[0]


def test_verdicts_on_known_numbers(study_file, tmp_path):
    fill_runs(tmp_path)
    path, results = report_study(load_study(str(study_file)), root=tmp_path, figures=False)
    by_id = {r["hypothesis"].id: r for r in results}

    auc = {arm: np.array([loss_auc([{"epoch": 1, "train_loss": 1.0}, {"epoch": 2, "train_loss": 0.5},
                                    {"epoch": 3, "train_loss": last}]) for last in losses])
           for arm, losses in LAST_LOSS.items()}
    p_fast = stats.ttest_ind(auc["fast"], auc["uniform"], equal_var=False, alternative="less").pvalue
    p_wrong = stats.ttest_ind(auc["slow"], auc["uniform"], equal_var=False, alternative="less").pvalue
    assert by_id["H_fast"]["p_support"] == pytest.approx(p_fast)
    assert by_id["H_wrong"]["p_support"] == pytest.approx(p_wrong)
    assert by_id["H_fast"]["verdict"] == "supported"
    assert by_id["H_wrong"]["verdict"] == "contradicted"

    # equivalence (TOST): max of the two one-sided shifted Welch tests
    a, b = np.array(FINAL_ACC["fast"]), np.array(FINAL_ACC["uniform"])
    p_tost = max(stats.ttest_ind(a + 0.05, b, equal_var=False, alternative="greater").pvalue,
                 stats.ttest_ind(a - 0.05, b, equal_var=False, alternative="less").pvalue)
    assert by_id["H_same"]["p_support"] == pytest.approx(p_tost)
    assert by_id["H_same"]["verdict"] == "supported"
    # noisy arm, tiny margin: not "inconclusive" but underpowered, with the seeds it needs
    tight = by_id["H_tight"]
    a_t, b_t = np.array(FINAL_ACC["slow"]), np.array(FINAL_ACC["uniform"])
    sd = math.sqrt((a_t.var(ddof=1) + b_t.var(ddof=1)) / 2)  # equal n: the pooled spread
    assert tight["sd"] == pytest.approx(sd)
    margin = tight["hypothesis"].margin
    assert tight["power"] == pytest.approx(tost_power(margin, sd, 4, alpha=0.01)) and tight["power"] < 0.8
    assert tight["verdict"] == f"underpowered (needs {seeds_needed(margin, sd, 0.01, equivalence=True)} seeds per arm)"

    # One Holm family: every hypothesis's claim and its opposite, adjusted together.
    order = ("H_fast", "H_wrong", "H_same", "H_tight")
    raw = [by_id[h][k] for h in order for k in ("p_support", "p_contra")]
    adjusted = [by_id[h][k] for h in order for k in ("p_support_holm", "p_contra_holm")]
    assert adjusted == pytest.approx(holm(raw), nan_ok=True)
    low, high = welch_interval(auc["fast"], auc["uniform"])
    assert by_id["H_fast"]["diff_ci"] == pytest.approx((low, high))
    assert low < by_id["H_fast"]["diff"] < high < 0

    text = path.read_text()
    assert "| H_fast |" in text and "**supported**" in text and "**contradicted**" in text
    assert "**underpowered (needs" in text
    assert (path.parent / "compare.md").exists() and (path.parent / "compare.csv").exists()


def test_arms_without_variance_are_inconclusive_not_significant(study_file, tmp_path):
    """Every run of both arms with the same number: no p-value is made up; the reason is given."""
    for arm, acc in (("uniform", 0.90), ("fast", 0.95), ("slow", 0.85)):
        for seed in range(3):
            make_run(tmp_path / "known", f"{arm}-s{seed}", "uniform" if arm == "uniform" else "depth_linear",
                     seed, accs=(0.6, 0.8, acc), arm=arm)
    _, results = report_study(load_study(str(study_file)), root=tmp_path, figures=False)
    for r in results:
        assert r["verdict"] == "inconclusive" and "no variance" in r["why"], r["why"]
        assert math.isnan(r["p_support"]) and math.isnan(r["p_contra"]) and math.isnan(r["diff_ci"][0])


def test_too_few_runs_is_inconclusive_and_cli_errors(study_file, tmp_path, capsys):
    make_run(tmp_path / "known", "uniform-s0", "uniform", 0, arm="uniform")
    make_run(tmp_path / "known", "fast-s0", "depth_linear", 0, arm="fast")
    _, results = report_study(load_study(str(study_file)), root=tmp_path, figures=False)
    assert all(r["verdict"] == "inconclusive" for r in results)
    assert all(math.isnan(r["p_support"]) for r in results)
    assert main(["report", str(study_file), "--root", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith("error: no runs for study known")


def test_plan_sizes_the_study_from_a_pilot(study_file, tmp_path, capsys):
    """The seeds per arm each preregistered effect needs, from the pilot's spread."""
    fill_runs(tmp_path)
    assert main(["plan", str(study_file), "--pilot", str(tmp_path / "known")]) == 0
    text = capsys.readouterr().out
    a, b = np.array(FINAL_ACC["slow"]), np.array(FINAL_ACC["uniform"])
    sd = math.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2)
    row = next(line for line in text.splitlines() if line.startswith("| H_tight "))
    assert f"| {seeds_needed(0.001, sd, 0.01, equivalence=True)} |" in row
    assert main(["plan", str(study_file)]) == 2  # --pilot is required: one line


def test_a_report_on_another_grid_is_exploratory_and_says_how(study_file, tmp_path):
    fill_runs(tmp_path)
    path, _ = report_study(load_study(str(study_file)), root=tmp_path, figures=False)
    assert path.read_text().startswith("# Study known: preregistered hypotheses")
    import shutil
    shutil.rmtree(tmp_path / "known" / "slow-s3")  # a seed short
    make_run(tmp_path / "known", "fast-s9", "depth_linear", 9, accs=(0.6, 0.9), losses=(1.0, 0.3), arm="fast")
    text = report_study(load_study(str(study_file)), root=tmp_path, figures=False)[0].read_text()
    head = text.split("\n\n")[1]
    assert text.startswith("# Study known: EXPLORATORY report")
    assert "trainer.epochs 2 (the file: 3)" in head and "arm slow: seeds missing [3]" in head
    assert "arm fast: seeds extra [9]" in head
    # a --force rerun beside the old run: that seed counted twice makes the report exploratory
    make_run(tmp_path / "known", "fast-s1-again", "depth_linear", 1, accs=(0.6, 0.9), losses=(1.0, 0.3), arm="fast")
    head = report_study(load_study(str(study_file)), root=tmp_path, figures=False)[0].read_text().split("\n\n")[1]
    assert "arm fast: seeds extra [9]; run more than once [1] (keep one run per seed)" in head


def test_report_aggregates_each_arm_by_its_interquartile_mean(study_file, tmp_path):
    from meta_llr.stats import iqm_ci

    fill_runs(tmp_path)
    text = report_study(load_study(str(study_file)), root=tmp_path, figures=False)[0].read_text()
    iqm, low, high = iqm_ci(FINAL_ACC["slow"])
    row = next(line for line in text.splitlines() if line.startswith("| slow | 4 |"))
    assert f"{iqm:.4g} [{low:.4g}, {high:.4g}]" in row


def test_arm_seeds_and_pilot_runs(tmp_path, capsys):
    """An arm may have its own seeds (run, and the grid a report checks, follow them); --seeds
    and --arms run other seeds of some arms (a pilot); a bad arm is one line."""
    study = dict(STUDY, grid=dict(STUDY["grid"], controllers=[
        {"name": "uniform"}, {"label": "fast", "name": "depth_linear", "seeds": [0, 1]}]), hypotheses=[])
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(study))
    loaded = load_study(str(path))
    commands = run_study(loaded, root=tmp_path, dry_run=True)
    assert ["seed=0,1,2,3" in c for c in commands] == [True, False] and "seed=0,1" in commands[1]
    pilot = run_study(loaded, root=tmp_path / "pilot", dry_run=True, seeds=[100, 101], arms=["fast"])
    assert len(pilot) == 1 and "+arm=fast" in pilot[0] and "seed=100,101" in pilot[0]
    assert main(["run", str(path), "--arms", "fast,nope", "--dry-run"]) == 2
    assert "--arms names nope" in capsys.readouterr().err
    from meta_llr.study import grid_differences
    make_run(tmp_path / "s", "fast-s0", "depth_linear", 0, arm="fast")
    make_run(tmp_path / "s", "fast-s1", "depth_linear", 1, arm="fast")
    from meta_llr.runs import find_runs
    differences = grid_differences(loaded, find_runs(tmp_path / "s"))
    assert not any("arm fast" in d for d in differences) and any("arm uniform" in d for d in differences)


def test_report_out_writes_the_report_beside_its_figures_with_commands_and_discussion(tmp_path):
    fill_runs(tmp_path)
    (tmp_path / "known.md").write_text("## Discussion\n\nWhat held.")
    study = dict(STUDY, commands=["python -m meta_llr.study run known"], discussion="known.md")
    path = tmp_path / "known.yaml"
    path.write_text(yaml.safe_dump(study))
    out = tmp_path / "docs" / "known-report.md"
    out.parent.mkdir()
    written, _ = report_study(load_study(str(path)), root=tmp_path, to=out)
    text = written.read_text()
    assert written == out and (tmp_path / "docs" / "known-report" / "curves.png").is_file()
    assert "](known-report/curves.png)" in text
    assert text.index("python -m meta_llr.study run known") < text.index("| id | claim")
    assert "## Discussion\n\nWhat held." in text
    (tmp_path / "known.md").unlink()
    with pytest.raises(UserError, match="discussion known.md is not a file"):
        load_study(str(path))


def test_a_powered_null_says_when_its_interval_excludes_the_preregistered_effect():
    from meta_llr.study import Hypothesis, _excludes

    h = Hypothesis("H", "a faster", "loss_auc", "<", "a", "b", None, "b", 0.05, "a < b", effect=0.1)
    assert "excludes the preregistered effect −0.1" in _excludes(h, {"diff_ci": (-0.05, 0.04)})
    assert _excludes(h, {"diff_ci": (-0.15, 0.04)}) == ""          # −0.1 still inside: nothing ruled out
    up = Hypothesis("H", "a slower", "loss_auc", ">", "a", "b", None, "b", 0.05, "a > b", effect=0.1)
    assert "+0.1" in _excludes(up, {"diff_ci": (-0.05, 0.04)}) and _excludes(up, {"diff_ci": (0.0, 0.2)}) == ""
    flipped = Hypothesis("H", "a faster", "loss_auc", "<", "a", "b", None, "a", 0.05, "a < b", effect=0.1)
    assert "+0.1" in _excludes(flipped, {"diff_ci": (-0.05, 0.04)})   # baseline a: the claim is b − a > 0


def test_a_setting_without_a_hypothesis_arms_is_not_judged_or_planned(study_file, tmp_path, capsys):
    fill_runs(tmp_path)
    make_run(tmp_path / "known", "stray-s0", "uniform", 0, model="mlp", arm="stray")  # another setting, no arms of the file
    _, results = report_study(load_study(str(study_file)), root=tmp_path, figures=False)
    assert len(results) == len(STUDY["hypotheses"]) and all(r["n_a"] == 4 for r in results)
    assert main(["plan", str(study_file), "--pilot", str(tmp_path / "known")]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| H_")]
    assert len(rows) == len(STUDY["hypotheses"])
