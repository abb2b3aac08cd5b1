"""Failures are visible: divergence with a reason, strict JSON records, chance accuracy, and
compare/study leaving diverged runs out of the means while saying how many and why."""
import csv
import json
import math

import pytest
import torch

from meta_llr.compare import compare, markdown
from meta_llr.records import dumps
from meta_llr.run import build_run
from meta_llr.runs import find_runs
from tests.conftest import TINY, compose_config
from tests.test_compare import make_run


def strict_json_lines(path):
    """Every line parses as strict JSON (NaN/Infinity tokens are rejected)."""
    def reject(token):
        raise ValueError(f"non-standard JSON token {token}")
    return [json.loads(line, parse_constant=reject) for line in path.read_text().splitlines()]


def train_loss_rows(path):
    with open(path / "train_loss.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def fit(tmp_path, *overrides):
    run = build_run(compose_config(*TINY, *overrides), tmp_path)
    return run.fit(), run


def test_loss_explosion_is_diverged_with_records(tmp_path):
    """A huge LR makes the loss grow far above the first interval's while staying finite."""
    summary, run = fit(tmp_path, "trainer.lr=50", "trainer.log_every=1", "trainer.eval_every_steps=1",
                       "trainer.weight_decay=0", "schedule=constant")
    assert summary["status"] == "diverged" and summary["reason"] == "loss_explosion"
    assert 0 < summary["diverged_at_step"] < run.plan.total_steps
    rows = train_loss_rows(tmp_path)
    losses = [float(r["train_loss"]) for r in rows]
    assert len(rows) == summary["diverged_at_step"] and all(math.isfinite(x) for x in losses)
    reference = min(losses[0], math.log(4))  # TINY has 4 classes: ln 4, a uniform guess's loss
    assert losses[-1] > 20 * reference and max(losses[:-1]) <= 20 * reference
    metrics = strict_json_lines(tmp_path / "metrics.jsonl")  # evaluations up to the divergence
    assert [r["step"] for r in metrics] == list(range(1, summary["diverged_at_step"]))
    saved = json.loads((tmp_path / "summary.json").read_text(), parse_constant=pytest.fail)
    assert saved["reason"] == "loss_explosion" and saved["chance_acc"] == summary["chance_acc"]
    for name in ("config.yaml", "layers.csv", "llr.csv", "env.json"):
        assert (tmp_path / name).is_file(), name


@pytest.mark.parametrize("log_every", [3, 1000])
def test_a_blow_up_in_the_first_interval_is_diverged(log_every, tmp_path):
    """The reference is capped at ln(classes): a first interval that already blew up cannot
    raise its own bar (log_every=3), and an epoch end checks the open interval (log_every=1000:
    no log point before the run's end)."""
    summary, run = fit(tmp_path, "trainer.lr=1000", f"trainer.log_every={log_every}", "trainer.weight_decay=0",
                       "schedule=constant", "trainer.epochs=2")
    assert summary["status"] == "diverged" and summary["reason"] == "loss_explosion", summary
    losses = [float(r["train_loss"]) for r in train_loss_rows(tmp_path)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] > 20 * math.log(4)
    assert summary["diverged_at_step"] == (3 if log_every == 3 else run.steps_per_epoch)


def test_non_finite_loss_is_diverged_non_finite(tmp_path):
    """NaN scales from step 1 on: NaN weights after it, NaN loss at step 2, caught at the log point."""
    def scales(step):
        return torch.full((len(run.layers),), math.nan if step >= 1 else 1.0)

    run = build_run(compose_config(*TINY, "trainer.log_every=3", "trainer.eval_every_steps=2"), tmp_path)
    run.controller.scales = scales
    summary = run.fit()
    assert summary["status"] == "diverged" and summary["reason"] == "non_finite"
    assert summary["diverged_at_step"] == 3
    # The evaluation at step 2: the losses of steps 0 and 1 are finite, the test loss is not.
    (row,) = strict_json_lines(tmp_path / "metrics.jsonl")
    assert row["step"] == 2 and row["epoch"] == 0.5
    assert math.isfinite(row["train_loss"]) and row["test_loss"] is None
    assert "NaN" not in (tmp_path / "summary.json").read_text()
    (interval,) = train_loss_rows(tmp_path)
    assert interval["step"] == "3" and math.isnan(float(interval["train_loss"]))


def test_non_finite_metrics_are_written_as_null(tmp_path):
    """An evaluation after the weights went NaN (no log point in between) writes nulls."""
    def scales(step):
        return torch.full((len(run.layers),), math.nan if step >= 1 else 1.0)

    run = build_run(compose_config(*TINY, "trainer.log_every=50", "trainer.eval_every_steps=3"), tmp_path)
    run.controller.scales = scales
    summary = run.fit()
    assert summary["status"] == "diverged" and summary["reason"] == "non_finite"
    assert summary["diverged_at_step"] == 4  # the epoch's end (not a log point) checks too
    (row,) = strict_json_lines(tmp_path / "metrics.jsonl")
    assert row["step"] == 3 and row["train_loss"] is None and row["test_loss"] is None
    assert [r["step"] for r in train_loss_rows(tmp_path)] == ["4"]  # the partial interval, shown
    saved = json.loads((tmp_path / "summary.json").read_text(), parse_constant=pytest.fail)
    assert saved["status"] == "diverged" and saved["final_train_loss"] is None


def test_dumps_is_strict():
    assert dumps({"a": math.nan, "b": [math.inf, 1.5], "c": torch.tensor(-math.inf)}) == \
        '{"a": null, "b": [null, 1.5], "c": null}'


def test_healthy_run_does_not_trip_and_records_chance(tmp_path):
    summary, _ = fit(tmp_path, "trainer.log_every=1", "trainer.divergence_factor=1.5")
    assert summary["status"] == "finished" and "reason" not in summary
    counts = torch.bincount(build_run(compose_config(*TINY), tmp_path / "x").eval_splits["test"][1])
    assert summary["chance_acc"] == pytest.approx(counts.max().item() / counts.sum().item())


def test_divergence_factor_range(make_config):
    from meta_llr.errors import UserError

    with pytest.raises(UserError, match=r"trainer.divergence_factor=1.0 is out of range; allowed: .*> 1"):
        make_config("trainer.divergence_factor=1.0")


def test_compare_leaves_diverged_out_and_says_why(tmp_path):
    for seed, acc in enumerate((0.90, 0.92, 0.91, 0.93)):
        make_run(tmp_path, f"uniform-s{seed}", "uniform", seed, accs=(0.5, 0.8, acc), chance_acc=0.1)
    make_run(tmp_path, "uniform-s4", "uniform", 4, accs=(0.5, 0.3, 0.1), status="diverged",
             reason="loss_explosion", chance_acc=0.1)
    for seed in range(3):
        make_run(tmp_path, f"bad-s{seed}", "bad", seed, accs=(0.1, 0.1, 0.105 + 0.001 * seed), chance_acc=0.1)
    make_run(tmp_path, "bad-s3", "bad", 3, status="diverged", reason="non_finite", chance_acc=0.1)
    make_run(tmp_path, "bad-s4", "bad", 4, status="diverged", chance_acc=0.1)  # records without a reason
    comparison = compare(find_runs(tmp_path), baseline="uniform", target=0.85)
    rows = {r["group"]: r for r in comparison.rows}
    assert rows["uniform"]["final_test_acc_mean"] == pytest.approx(0.915)  # the diverged run left out
    assert rows["uniform"]["diverged"] == 1 and rows["uniform"]["diverged_reasons"] == "loss_explosion:1"
    assert rows["bad"]["diverged_reasons"] == "non_finite:1;unknown:1"
    assert rows["bad"]["near_chance"] and not rows["uniform"]["near_chance"]
    assert rows["bad"]["chance_acc"] == pytest.approx(0.1)
    text = markdown(comparison, {})
    assert "| uniform | 5 runs, 1 diverged (loss_explosion) |" in text
    assert "| bad | 5 runs, 2 diverged (1 non_finite, 1 unknown) |" in text
    assert "(at chance 0.100)" in text and "within 1 point of chance" in text


def test_study_counts_diverged_per_arm_and_does_not_rerun_them(tmp_path):
    import yaml

    from meta_llr.study import load_study, report_study, run_study

    study = {"name": "div", "grid": {"model": "shallow", "data": "digits", "epochs": 3, "seeds": [0, 1, 2],
                                     "controllers": [{"name": "uniform"}, {"label": "hot", "name": "uniform",
                                                                           "overrides": {"trainer.lr": 1}}]},
             "hypotheses": [{"id": "H", "claim": "hot is worse", "comparison": "hot < uniform"}]}
    (tmp_path / "div.yaml").write_text(yaml.safe_dump(study))
    study = load_study(str(tmp_path / "div.yaml"))
    for seed, acc in enumerate((0.90, 0.91, 0.92)):
        make_run(tmp_path / "div", f"uniform-s{seed}", "uniform", seed, accs=(0.5, 0.8, acc), arm="uniform")
    for seed, acc in enumerate((0.80, 0.82)):
        make_run(tmp_path / "div", f"hot-s{seed}", "uniform", seed, accs=(0.5, 0.7, acc), arm="hot")
    make_run(tmp_path / "div", "hot-s2", "uniform", 2, status="diverged", reason="loss_explosion", arm="hot")
    assert run_study(study, root=tmp_path, dry_run=True) == []  # a diverged seed is a result
    path, (result,) = report_study(study, root=tmp_path, figures=False)
    assert result["n_a"] == 2 and result["left_out"] == ["hot 3 runs, 1 diverged (loss_explosion)"]
    text = path.read_text()
    assert "Left out of the means: hot 3 runs, 1 diverged (loss_explosion)." in text
    assert "| hot | 3 runs, 1 diverged (loss_explosion) |" in text


def test_one_host_transfer_per_log_point(tmp_path):
    """Outside evaluations and the final flushes the loop copies to the host once per log
    point (both divergence checks in one transfer), and once at an epoch's end that is not one."""
    from tests.test_contract import count_host_syncs

    def run_syncs(log_every):
        run = build_run(compose_config(*TINY, f"trainer.log_every={log_every}"), tmp_path / str(log_every))
        inside, depth = [], []
        for name in ("log_evaluation", "flush_trace", "flush_train_loss"):
            def wrapped(*args, _method=getattr(run, name), **kwargs):
                before = len(syncs)
                depth.append(1)
                out = _method(*args, **kwargs)
                depth.pop()
                if not depth:  # the flushes inside an evaluation are counted with it
                    inside.append(len(syncs) - before)
                return out
            setattr(run, name, wrapped)
        with count_host_syncs() as syncs:
            assert run.fit()["status"] == "finished"
        return len(syncs) - sum(inside)

    assert run_syncs(2) == 4  # 8 steps: log points 2, 4 (an epoch's end), 6, 8
    assert run_syncs(3) == 4  # log points 3, 6, 8, and the end of epoch 1 (step 4)
