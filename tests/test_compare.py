"""compare: statistics against scipy on run directories with known numbers, splits, figures."""
import csv
import json
import math

import numpy as np
import pytest
import yaml
from scipy import stats

from meta_llr.compare import compare, first_reaching, loss_auc, main, markdown
from meta_llr.errors import UserError
from meta_llr.runs import find_runs

LAYERS = ["conv1", "conv2", "head"]


def make_run(root, name, controller="uniform", seed=0, accs=(0.5, 0.8, 0.9), losses=(1.0, 0.5, 0.3),
             status="finished", epochs=None, model="shallow", data="digits", lr=0.05, scales=(1.0, 1.0, 1.0),
             steps_per_epoch=10, extra_config=None, arm=None, reason=None, chance_acc=None):
    """A run directory with the records train.py writes, from given per-epoch numbers."""
    path = root / name
    path.mkdir(parents=True)
    epochs = epochs or len(accs)
    metrics = [{"epoch": e + 1, "step": (e + 1) * steps_per_epoch, "train_loss": loss, "train_acc": acc + 0.05,
                "test_loss": loss * 1.1, "test_acc": acc, "lr": lr, "wall_s": float(e + 1)}
               for e, (acc, loss) in enumerate(zip(accs, losses))]
    (path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    config = {"controller": {"name": controller}, "model": {"name": model, "width": 32},
              "data": {"name": data}, "seed": seed, "study": "t", "trainer": {"epochs": epochs, "lr": lr}}
    if arm:
        config["arm"] = arm
    config.update(extra_config or {})
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    total = epochs * steps_per_epoch
    with open(path / "llr.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "progress", "global_lr", *LAYERS])
        for step in range(total):
            writer.writerow([step, step / total, lr, *scales])
    with open(path / "layer_stats.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", "step", "layer", "name", "rotation"])
        for e in range(len(accs)):
            for i, layer in enumerate(LAYERS):
                writer.writerow([e + 1, (e + 1) * steps_per_epoch, i, layer, 0.01 * (e + 1) * (i + 1)])
    summary = {"status": status, "final_test_acc": accs[-1], "best_test_acc": max(accs),
               "final_train_acc": accs[-1] + 0.05, "final_train_loss": losses[-1], "steps": total,
               "wall_s": float(epochs), "controller": controller, "model": model, "data": data, "seed": seed,
               "study": "t", "layers": LAYERS}
    if reason:
        summary["reason"] = reason
    if chance_acc is not None:
        summary["chance_acc"] = chance_acc
    (path / "summary.json").write_text(json.dumps(summary))
    return path


FINALS = {"uniform": [0.90, 0.91, 0.92], "fast": [0.95, 0.96, 0.94], "slow": [0.88, 0.91, 0.89, 0.90]}


@pytest.fixture
def study(tmp_path):
    root = tmp_path / "study"
    for controller, finals in FINALS.items():
        for seed, final in enumerate(finals):
            make_run(root, f"{controller}-s{seed}", controller, seed, accs=(0.5, 0.8, final))
    return root


def test_group_statistics_match_scipy(study):
    comparison = compare(find_runs(study), baseline="uniform", target=0.85)
    rows = {r["group"]: r for r in comparison.rows}
    assert set(rows) == set(FINALS) and len(comparison.settings) == 1
    for name, finals in FINALS.items():
        row, x = rows[name], np.array(finals)
        low, high = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
        assert row["final_test_acc_mean"] == pytest.approx(x.mean())
        assert row["final_test_acc_std"] == pytest.approx(x.std(ddof=1))
        assert (row["final_test_acc_ci_low"], row["final_test_acc_ci_high"]) == pytest.approx((low, high))
        assert row["finished"] == len(finals)
    base = np.array(FINALS["uniform"])
    p_values = {}
    for name in ("fast", "slow"):
        ref = stats.ttest_ind(np.array(FINALS[name]), base, equal_var=False)
        assert rows[name]["t"] == pytest.approx(ref.statistic)
        assert rows[name]["p"] == pytest.approx(ref.pvalue)
        p_values[name] = ref.pvalue
    # Holm with m = 2: the smaller p doubled, the larger kept >= it.
    small, large = sorted(p_values, key=p_values.get)
    assert rows[small]["p_holm"] == pytest.approx(2 * p_values[small])
    assert rows[large]["p_holm"] == pytest.approx(max(2 * p_values[small], p_values[large]))
    assert math.isnan(rows["uniform"]["p"])
    # Hedges' g by hand: pooled std, J correction.
    a, b = np.array(FINALS["fast"]), base
    pooled = math.sqrt((2 * a.var(ddof=1) + 2 * b.var(ddof=1)) / 4)
    assert rows["fast"]["hedges_g"] == pytest.approx((1 - 3 / (4 * 6 - 9)) * (a.mean() - b.mean()) / pooled)


def test_no_variance_is_nan_with_a_note(tmp_path):
    """Every run of both groups with the same final accuracy: no t-test (p NaN, not 0), a note says why."""
    for name, final in (("uniform", 0.9), ("same", 0.95)):
        for seed in range(3):
            make_run(tmp_path, f"{name}-s{seed}", name, seed, accs=(0.5, 0.8, final))
    comparison = compare(find_runs(tmp_path), baseline="uniform")
    row = next(r for r in comparison.rows if r["group"] == "same")
    assert math.isnan(row["t"]) and math.isnan(row["p"]) and math.isnan(row["p_holm"])
    assert row["diff"] == pytest.approx(0.05)
    assert any("same vs uniform" in note and "no variance" in note for note in comparison.settings[0].notes)


def test_steps_to_target_and_auc_on_constructed_curve():
    metrics = [{"epoch": e, "step": 10 * e, "test_acc": acc, "train_loss": loss}
               for e, acc, loss in [(1, 0.3, 2.0), (2, 0.7, 1.0), (3, 0.72, 0.5), (4, 0.9, 0.25)]]
    assert first_reaching(metrics, 0.7)["step"] == 20
    assert first_reaching(metrics, 0.71)["epoch"] == 3
    assert first_reaching(metrics, 0.95) is None
    assert loss_auc(metrics) == pytest.approx(2.0 + 1.0 + 0.5 + 0.25)  # mean loss per epoch x 1 epoch
    sparse = [{"epoch": 2, "train_loss": 1.0}, {"epoch": 5, "train_loss": 0.5}]  # eval_every > 1
    assert loss_auc(sparse) == pytest.approx(1.0 * 2 + 0.5 * 3)


def test_steps_to_target_median_and_never_reached(tmp_path):
    make_run(tmp_path, "a", "uniform", 0, accs=(0.5, 0.8, 0.9))   # reaches 0.8 at step 20
    make_run(tmp_path, "b", "uniform", 1, accs=(0.8, 0.85, 0.9))  # at step 10
    make_run(tmp_path, "c", "uniform", 2, accs=(0.5, 0.6, 0.7))   # never
    (row,) = compare(find_runs(tmp_path), target=0.8).rows
    assert row["steps_to_target_median"] == 15 and row["reached_target"] == 2
    assert row["epochs_to_target_median"] == 1.5


def test_different_settings_are_split_and_said(tmp_path):
    make_run(tmp_path, "a", "uniform", 0)
    make_run(tmp_path, "b", "uniform", 0, data="cifar10")
    make_run(tmp_path, "c", "uniform", 0, accs=(0.5, 0.8, 0.9, 0.95))  # 4 epochs
    comparison = compare(find_runs(tmp_path))
    assert len(comparison.settings) == 3
    assert all("never pooled" in s.notes[0] for s in comparison.settings)


def test_config_differences_inside_a_group_split_it(tmp_path):
    make_run(tmp_path, "a", "uniform", 0, lr=0.05)
    make_run(tmp_path, "b", "uniform", 1, lr=0.1)
    (setting,) = compare(find_runs(tmp_path)).settings
    assert sorted(setting.groups) == ["uniform [trainer.lr=0.05]", "uniform [trainer.lr=0.1]"]
    assert "trainer.lr" in setting.notes[0]


def test_arm_labels_group_same_controller_separately(tmp_path):
    make_run(tmp_path, "a", "depth_linear", 0, arm="steep", extra_config={"controller": {"name": "depth_linear", "first": 1.5}})
    make_run(tmp_path, "b", "depth_linear", 0, arm="reversed", extra_config={"controller": {"name": "depth_linear", "first": 0.5}})
    (setting,) = compare(find_runs(tmp_path)).settings
    assert sorted(setting.groups) == ["reversed", "steep"]


def test_diverged_and_broken_runs_are_counted_not_fatal(study, tmp_path):
    make_run(study, "uniform-div", "uniform", 9, accs=(0.5, 0.1, 0.1), status="diverged")
    broken = study / "uniform-broken"
    broken.mkdir()
    (broken / "summary.json").write_text("{not json")
    comparison = compare(find_runs(study), target=0.85)
    row = next(r for r in comparison.rows if r["group"] == "uniform")
    assert row["diverged"] == 1 and row["finished"] == 3
    assert row["final_test_acc_mean"] == pytest.approx(np.mean(FINALS["uniform"]))  # diverged left out
    assert any("diverged" in note for note in comparison.settings[0].notes)
    assert any(r.status == "unreadable" for r in find_runs(study))


def test_interrupted_and_running_runs_are_counted_and_named(study):
    """Every status a run can record is a column and a word in the table: an interrupted or
    a still-running run is not a silent gap in n."""
    make_run(study, "uniform-cut", "uniform", 7, status="interrupted")
    make_run(study, "uniform-live", "uniform", 8, status="running")
    comparison = compare(find_runs(study))
    row = next(r for r in comparison.rows if r["group"] == "uniform")
    assert row["finished"] == 3 and row["interrupted"] == 1 and row["running"] == 1 and row["runs"] == 5
    assert "| uniform | 5 runs, 1 interrupted, 1 running |" in markdown(comparison, {})


def test_empty_or_missing_directory_is_one_line_error(tmp_path, capsys):
    with pytest.raises(UserError, match="no run directories"):
        find_runs(tmp_path)
    assert main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_cli_writes_report_csv_and_figures(study, tmp_path):
    out = tmp_path / "out"
    assert main([str(study), "--out", str(out), "--target-acc", "0.85"]) == 0
    text = (out / "compare.md").read_text()
    assert "| fast |" in text and "Holm" in text and "![curves.png](curves.png)" in text
    for name in ("curves.png", "llr_heatmap.png", "rotation.png", "compare.csv"):
        assert (out / name).stat().st_size > 1000
    with open(out / "compare.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["group"] for r in rows} == set(FINALS)


def test_finer_evaluations_resolve_steps_to_target(tmp_path):
    """With trainer.eval_every_steps the evaluation rows are finer (fractional epochs): steps and
    epochs to target resolve them, and the loss AUC stays the area under the same curve."""
    coarse = make_run(tmp_path, "coarse", "uniform", 0, accs=(0.5, 0.8, 0.9), losses=(1.0, 0.5, 0.3))
    fine = make_run(tmp_path, "fine", "uniform", 1, accs=(0.5, 0.8, 0.9), losses=(1.0, 0.5, 0.3))
    rows = []
    for e, (acc, loss) in enumerate([(0.4, 1.2), (0.5, 0.8), (0.7, 0.6), (0.8, 0.4), (0.85, 0.35), (0.9, 0.25)]):
        rows.append({"epoch": 0.5 * (e + 1) if e % 2 == 0 else (e + 1) // 2, "step": 5 * (e + 1),
                     "train_loss": loss, "test_acc": acc})
    (fine / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert first_reaching(rows, 0.8) == rows[3] and rows[3]["epoch"] == 2
    assert first_reaching(rows, 0.7)["epoch"] == 1.5 and first_reaching(rows, 0.7)["step"] == 15
    assert loss_auc(rows) == pytest.approx(0.5 * (1.2 + 0.8 + 0.6 + 0.4 + 0.35 + 0.25))
    runs = {r.name: r for r in find_runs(tmp_path)}
    from meta_llr.compare import run_values
    assert run_values(runs["fine"], 0.7)["epochs_to_target"] == 1.5
    assert run_values(runs["coarse"], 0.7)["epochs_to_target"] == 2
    assert coarse.is_dir()


def test_every_comparison_states_its_power(tmp_path):
    """Beside each test: the difference's Welch interval, the pooled seed spread, the smallest
    difference detectable at this n, and the seeds per arm the given --effect and the observed
    difference need (meta_llr.stats, noncentral t)."""
    from meta_llr.compare import markdown
    from meta_llr.stats import detectable_effect, power_t, seeds_needed, welch_interval

    finals = {"uniform": (0.900, 0.905, 0.898), "depth_linear": (0.904, 0.911, 0.903)}
    for controller, values in finals.items():
        for seed, acc in enumerate(values):
            make_run(tmp_path, f"{controller}-{seed}", controller, seed, accs=(0.5, 0.8, acc))
    comparison = compare(find_runs(tmp_path), effect=0.005)
    row = next(r for r in comparison.rows if r["group"] == "depth_linear")
    a, b = np.array(finals["depth_linear"]), np.array(finals["uniform"])
    sd = math.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2)
    assert row["sd"] == pytest.approx(sd)
    assert (row["diff_ci_low"], row["diff_ci_high"]) == pytest.approx(welch_interval(a, b))
    assert row["detectable"] == pytest.approx(detectable_effect(sd, 3))
    assert row["power"] == pytest.approx(power_t(0.005, sd, 3)) and row["needs"] == seeds_needed(0.005, sd)
    assert row["needs_observed"] == seeds_needed(a.mean() - b.mean(), sd)
    text = markdown(comparison, {})
    assert "power for 0.005" in text and f"| {row['needs']} |" in text
    assert main([str(tmp_path), "--effect", "-1"]) == 2  # one line


def test_a_running_run_joins_its_setting_by_its_env_json(tmp_path):
    """The data source (here the lossy JPEG copy) is in env.json from the start, so a run still
    going (no summary.json) is pooled with the finished runs of its setting, not set apart."""
    from meta_llr.runs import read_run

    done = make_run(tmp_path, "done", data="imagefolder")
    going = make_run(tmp_path, "going", data="imagefolder", seed=1)
    summary = json.loads((done / "summary.json").read_text())
    (done / "summary.json").write_text(json.dumps({**summary, "data_source": "CIFAR-10 JPEG q75 copy"}))
    (going / "summary.json").unlink()
    for path in (done, going):
        (path / "env.json").write_text(json.dumps({"data_source": "CIFAR-10 JPEG q75 copy"}))
    settings = [read_run(p).setting for p in (done, going)]
    assert settings[0] == settings[1] and settings[0]["data"].endswith("[JPEG]"), settings
