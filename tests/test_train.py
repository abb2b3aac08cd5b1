"""The loop: exact resume, real learning, per-layer LRs actually applied."""
import csv
import io
import json

import pytest
import torch

from meta_llr.run import build_run, train
from tests.conftest import TINY, compose_config


def test_digits_reaches_90_percent(tmp_path):
    cfg = compose_config("quiet=true", "device=cpu", "trainer.checkpoint=false")
    summary = train(cfg, tmp_path)
    assert summary["status"] == "finished" and summary["final_test_acc"] >= 0.90


def test_resume_mid_epoch_is_exact(tmp_path):
    cfg = compose_config(*TINY, "trainer.epochs=3")
    straight = build_run(cfg, tmp_path / "a")
    straight.fit()

    interrupted = build_run(cfg, tmp_path / "b")
    for i, (x, y) in enumerate(interrupted.batches()):
        interrupted.train_step(x, y)
        if i == 1:
            break
    state = interrupted.state_dict()
    interrupted.close()  # as its process ending would
    resumed = build_run(cfg, tmp_path / "b")
    resumed.load_state_dict(state)
    resumed.fit()
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert straight.records.metrics[-1]["test_acc"] == resumed.records.metrics[-1]["test_acc"]


class Stop(Exception):
    pass


def test_resume_with_step_evaluations_is_exact(tmp_path):
    """eval_every_steps and train_loss.csv: a run stopped after a mid-epoch evaluation and
    resumed from its state writes the same records as one run straight through."""
    cfg = compose_config(*TINY, "trainer.epochs=3", "trainer.log_every=3", "trainer.eval_every_steps=3")
    straight = build_run(cfg, tmp_path / "a")
    straight.fit()
    metrics = [{k: v for k, v in row.items() if k != "wall_s"} for row in straight.records.metrics]
    # 4 steps per epoch: every 3rd step inside an epoch (fractional epoch) and every epoch's end.
    assert [(r["step"], r["epoch"]) for r in metrics] == [(3, 0.75), (4, 1), (6, 1.5), (8, 2), (9, 2.25), (12, 3)]
    assert [r["epoch"] for r in straight.diagnostics.rows[::len(straight.layers)]] == [1, 2, 3]  # per epoch

    interrupted = build_run(cfg, tmp_path / "b")
    evaluate, saved = interrupted.log_evaluation, io.BytesIO()

    def evaluate_then_stop(wall):
        row = evaluate(wall)
        if interrupted.step == 6:  # inside epoch 2, after its evaluation: a step boundary
            torch.save(interrupted.state_dict(), saved)
            raise Stop
        return row

    interrupted.log_evaluation = evaluate_then_stop
    with pytest.raises(Stop):
        interrupted.fit()
    resumed = build_run(cfg, tmp_path / "b")
    saved.seek(0)
    resumed.load_state_dict(torch.load(saved, weights_only=False))
    resumed.fit()
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert [{k: v for k, v in row.items() if k != "wall_s"} for row in resumed.records.metrics] == metrics
    for name in ("train_loss.csv", "llr.csv", "layer_stats.csv"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text(), name


def read_train_loss(path):
    with open(path / "train_loss.csv", newline="") as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def test_train_loss_csv_has_one_row_per_log_interval(tmp_path):
    """Rows at every log_every-th step and the last; each the mean of its steps' losses."""
    every_step = build_run(compose_config(*TINY, "trainer.epochs=3", "trainer.log_every=1"), tmp_path / "a")
    every_step.fit()
    per_step = read_train_loss(tmp_path / "a")
    assert [r["step"] for r in per_step] == list(range(1, 13))
    assert [r["epoch"] for r in per_step] == [round(s / 4, 6) for s in range(1, 13)]
    assert [r["lr"] for r in per_step] == [float(every_step.lr_host[s - 1]) for s in range(1, 13)]
    build_run(compose_config(*TINY, "trainer.epochs=3", "trainer.log_every=5"), tmp_path / "b").fit()
    intervals = read_train_loss(tmp_path / "b")
    assert [r["step"] for r in intervals] == [5, 10, 12]
    losses = [r["train_loss"] for r in per_step]  # equal batches (64 = 4 x 16): plain means
    for row, (lo, hi) in zip(intervals, [(0, 5), (5, 10), (10, 12)]):
        assert row["train_loss"] == pytest.approx(sum(losses[lo:hi]) / (hi - lo), rel=1e-5)


def test_layer_lrs_reach_the_optimizer(tmp_path):
    """With scale 0 on all but the last layer (lr * 0), only the head moves."""
    cfg = compose_config(*TINY, "trainer.weight_decay=0")
    run = build_run(cfg, tmp_path)
    frozen_scales = torch.tensor([0.0] * (len(run.layers) - 1) + [1.0])
    run.controller.scales = lambda step: frozen_scales
    before = [[p.detach().clone() for p in layer.params] for layer in run.layers]
    x, y = next(iter(run.batches()))
    run.train_step(x, y)
    for layer, old in zip(run.layers, before):
        moved = any(not torch.equal(p, q) for p, q in zip(layer.params, old))
        assert moved == (layer.index == len(run.layers) - 1), layer.name


def test_grouping_reaches_the_controller(tmp_path):
    cfg = compose_config(*TINY, "model.depth=3", "layers.groups=2")
    run = build_run(cfg, tmp_path)
    assert len(run.layers) == 2 and run.controller.num_layers == 2
    assert [row["group"] for row in run.layer_rows] == [0, 0, 1, 1]


def test_stats_match_direct_computation(tmp_path):
    """grad_norm, update_norm, weight_norm and grad_dot_prev_update against plain torch."""
    cfg = compose_config(*TINY)
    run = build_run(cfg, tmp_path)
    run.needs = frozenset({"grad_norm", "update_norm", "weight_norm", "grad_dot_prev_update"})
    run.prev = [torch.zeros_like(p) for p in run.params]
    run.observes = True
    captured = []
    run.controller.observe = lambda step, stats: captured.append(
        ({k: v.clone() for k, v in stats.items()},
         [[p.grad.clone() for p in layer.params] for layer in run.layers]))
    weights = [[[p.detach().clone() for p in layer.params] for layer in run.layers]]
    batches = iter(run.batches())
    for _ in range(3):
        run.train_step(*next(batches))
        weights.append([[p.detach().clone() for p in layer.params] for layer in run.layers])
    for t, (stats, grads) in enumerate(captured):
        for l in range(len(run.layers)):
            g = torch.cat([q.flatten() for q in grads[l]])
            u = torch.cat([(a - b).flatten() for a, b in zip(weights[t + 1][l], weights[t][l])])
            u_prev = (torch.cat([(a - b).flatten() for a, b in zip(weights[t][l], weights[t - 1][l])])
                      if t > 0 else torch.zeros_like(g))
            w = torch.cat([a.flatten() for a in weights[t + 1][l]])
            torch.testing.assert_close(stats["grad_norm"][l], g.norm())
            torch.testing.assert_close(stats["update_norm"][l], u.norm())
            torch.testing.assert_close(stats["weight_norm"][l], w.norm())
            torch.testing.assert_close(stats["grad_dot_prev_update"][l], g @ u_prev, rtol=1e-4, atol=1e-7)


def test_failed_run_keeps_records(tmp_path):
    cfg = compose_config(*TINY)
    run = build_run(cfg, tmp_path)

    def explode(*args):
        raise RuntimeError("boom")

    run.evaluate = explode
    try:
        run.fit()
    except RuntimeError:
        pass
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "boom" in summary["error"]
    assert (tmp_path / "llr.csv").is_file() and (tmp_path / "layers.csv").is_file()


def test_statistics_and_updates_build_no_autograd_graph(tmp_path):
    """The loop's update buffer and the statistics stay out of autograd: a graph through them
    would grow by a few nodes per step and keep every step's gradients alive."""
    run = build_run(compose_config(*TINY, "controller=hypergrad"), tmp_path)
    seen = {}
    observe = run.controller.observe
    run.controller.observe = lambda step, stats: (seen.update(stats), observe(step, stats))
    for x, y in run.batches():
        run.train_step(x, y)
    assert run.prev is not None and not any(t.requires_grad for t in run.prev)
    assert not any(v.requires_grad for v in seen.values() if isinstance(v, torch.Tensor))
