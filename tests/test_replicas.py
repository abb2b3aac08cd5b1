"""replicas=S: each replica is the run of its seed (within float rounding), writes an ordinary
run directory, resumes, and a step's kernel ops do not grow with S."""
import json

import pytest
import torch

from meta_llr.bench import _OpCounter
from meta_llr.data import load_data
from meta_llr.errors import Interrupted
from meta_llr.replicas import Replicas, build_replicas, train_replicas
from meta_llr.run import build_run, train
from meta_llr.runs import find_runs
from tests.conftest import TINY, compose_config
from tests.test_contract import count_host_syncs

# BatchNorm (buffers per replica) and convolutions (grouped under vmap): the shallow CNN.
SMALL = ["data=synthetic", "data.channels=1", "data.size=8", "data.classes=4", "data.train_size=96",
         "data.test_size=32", "model=shallow", "model.width=4", "trainer.epochs=1", "trainer.batch_size=16",
         "quiet=true", "trainer.checkpoint=false", "device=cpu"]


def forever(run):
    """A run's batches across epochs (``batches()`` ends with its epoch)."""
    while True:
        yield from run.batches()


def signal_after(step, signum=15):
    """``Replicas.train_step`` that, after ``step`` steps, delivers ``signum`` as the group's handler would."""
    original = Replicas.train_step

    def train_step(self, batches):
        original(self, batches)
        if self.runs[0].step == step:
            self.stop_signal = signum
            for run in self.runs:
                run.stop_signal = signum

    return train_step


def steps_of(run_or_group, count):
    """``count`` more steps, the draws continuing where the last call left them."""
    if isinstance(run_or_group, Replicas):
        if not hasattr(run_or_group, "draws"):
            run_or_group.draws = [forever(run) for run in run_or_group.runs]
        for _ in range(count):
            run_or_group.train_step({i: next(d) for i, d in enumerate(run_or_group.draws)})
    else:
        if not hasattr(run_or_group, "draws"):
            run_or_group.draws = forever(run_or_group)
        for _ in range(count):
            run_or_group.train_step(*next(run_or_group.draws))


@pytest.mark.parametrize("name", ["uniform", "depth_linear", "hessian_secant", "adam_probe"])
def test_each_replica_is_the_run_of_its_seed(name, tmp_path):
    options = [*SMALL, f"controller={name}"]
    if name == "hessian_secant":
        options.append("controller.interval=2")  # a curvature probe within the 5 steps
    data = load_data(compose_config(*options).data)
    group = build_replicas(compose_config(*options, "seed=3", "replicas=3"), [tmp_path / f"r{i}" for i in range(3)],
                           data=data)
    steps_of(group, 5)
    tol = 1e-5
    for i, replica in enumerate(group.runs):
        single = build_run(compose_config(*options, f"seed={3 + i}"), tmp_path / f"single{i}", data=data)
        steps_of(single, 5)
        ours, theirs = dict(replica.model.named_parameters()), dict(single.model.named_parameters())
        ours, theirs = ({k: v.detach() for k, v in d.items()} for d in (ours, theirs))
        # relative to the model's largest weight: a bias before BatchNorm has a gradient of pure
        # rounding noise, and its own scale says nothing
        largest = max(float(v.abs().max()) for v in theirs.values())
        for key, value in theirs.items():
            torch.testing.assert_close(ours[key], value, rtol=tol, atol=tol * largest, msg=key)
        for (key, a), (_, b) in zip(replica.model.named_buffers(), single.model.named_buffers()):
            if a.is_floating_point():
                torch.testing.assert_close(a, b, rtol=tol, atol=tol / 10, msg=key)
        torch.testing.assert_close(replica.trace[:5], single.trace[:5], rtol=1e-5, atol=1e-5)
    # the replicas differ from one another (their own seeds, data orders)
    first, second = (dict(r.model.named_parameters()) for r in group.runs[:2])
    assert not all(torch.equal(first[k], second[k]) for k in first)


def test_replicas_write_ordinary_run_dirs_that_resume_exactly(tmp_path, monkeypatch):
    cfg = compose_config(*TINY, "replicas=2", "seed=4", "trainer.checkpoint=true", "trainer.resume=auto")
    whole = train_replicas(cfg, tmp_path / "whole")
    assert [s["status"] for s in whole] == ["finished", "finished"] and [s["seed"] for s in whole] == [4, 5]
    runs = find_runs(tmp_path / "whole")
    assert [r.path.name for r in runs] == ["s4", "s5"] and all(r.status == "finished" for r in runs)
    assert [r.get("seed") for r in runs] == [4, 5] and all(r.get("replicas") == 2 for r in runs)
    # pooled with a single run of the same config: replicas=S is how runs were trained, not what

    train(compose_config(*TINY, "seed=6"), tmp_path / "whole" / "single")
    from meta_llr.compare import split_settings

    groups = split_settings(find_runs(tmp_path / "whole"), "controller")[0].groups
    assert list(groups) == ["uniform"] and len(groups["uniform"].runs) == 3

    # stopped by a signal mid-epoch 2, then continued: the same records as the uninterrupted replicas
    original = Replicas.train_step
    monkeypatch.setattr(Replicas, "train_step", signal_after(6))
    with pytest.raises(Interrupted):
        train_replicas(cfg, tmp_path / "cut")
    assert [json.loads((tmp_path / "cut" / s / "summary.json").read_text())["status"] for s in ("s4", "s5")] \
        == ["interrupted", "interrupted"]
    monkeypatch.setattr(Replicas, "train_step", original)
    resumed = train_replicas(cfg, tmp_path / "cut")
    assert [s["status"] for s in resumed] == ["finished", "finished"]
    for seed in ("s4", "s5"):
        for name in ("llr.csv", "train_loss.csv"):
            assert (tmp_path / "cut" / seed / name).read_text() == (tmp_path / "whole" / seed / name).read_text()
        strip = [{k: v for k, v in json.loads(line).items() if k != "wall_s"}
                 for folder in ("cut", "whole") for line in (tmp_path / folder / seed / "metrics.jsonl").read_text().splitlines()]
        half = len(strip) // 2
        assert strip[:half] == strip[half:]
    # finished: a relaunch trains nothing and returns the summaries
    assert [s["status"] for s in train(cfg, tmp_path / "whole")["replicas"]] == ["finished", "finished"]


def test_a_diverged_replica_leaves_the_others_training_and_resuming(tmp_path, monkeypatch):
    """Replica s1 goes NaN at step 2: the others finish through the epoch's short last batch
    (60 images, batch 16), its records stay as they were, and after a stop the group resumes
    without touching them; s0 and s2 end as uninterrupted replicas do."""
    import math
    from meta_llr.run import Run

    cfg = compose_config(*TINY, "data.train_size=60", "replicas=3", "trainer.log_every=1", "trainer.checkpoint=true",
                         "trainer.resume=auto")
    original_decide = Run.decide

    def nan_for_s1(self, *args):
        scales = original_decide(self, *args)
        return scales * math.nan if int(self.cfg.seed) == 1 and self.step >= 2 else scales

    monkeypatch.setattr(Run, "decide", nan_for_s1)
    whole = train_replicas(cfg, tmp_path / "whole")
    assert [s["status"] for s in whole] == ["finished", "diverged", "finished"], whole
    assert whole[1]["reason"] == "non_finite" and whole[0]["steps"] == 8

    original_step = Replicas.train_step
    monkeypatch.setattr(Replicas, "train_step", signal_after(5))
    with pytest.raises(Interrupted):
        train_replicas(cfg, tmp_path / "cut")
    diverged = (tmp_path / "cut" / "s1" / "summary.json").read_text()
    monkeypatch.setattr(Replicas, "train_step", original_step)
    resumed = train_replicas(cfg, tmp_path / "cut")
    assert [s["status"] for s in resumed] == ["finished", "diverged", "finished"]
    assert (tmp_path / "cut" / "s1" / "summary.json").read_text() == diverged   # left as it was
    for seed in ("s0", "s2"):
        assert (tmp_path / "cut" / seed / "llr.csv").read_text() == (tmp_path / "whole" / seed / "llr.csv").read_text()


def test_an_error_in_one_replicas_records_is_recorded_by_all(tmp_path, monkeypatch):
    """A write that fails in replica s0's evaluation (a full disk): every replica still training
    says failed, none is left saying running."""
    from meta_llr.run import Run

    original = Run.log_evaluation

    def full_disk_for_s0(self, wall):
        if int(self.cfg.seed) == 0:
            raise OSError(28, "No space left on device")
        return original(self, wall)

    monkeypatch.setattr(Run, "log_evaluation", full_disk_for_s0)
    with pytest.raises(OSError):
        train_replicas(compose_config(*TINY, "replicas=2"), tmp_path)
    for seed in ("s0", "s1"):
        summary = json.loads((tmp_path / seed / "summary.json").read_text())
        assert summary["status"] == "failed" and "No space left" in summary["error"], (seed, summary)


@pytest.mark.parametrize("name", ["uniform", "depth_linear"])
def test_kernel_ops_per_step_at_8_replicas_within_1_2x_of_1(name, tmp_path):
    counts = []
    for replicas in (1, 8):
        group = build_replicas(compose_config(*SMALL, f"controller={name}", f"replicas={replicas}"),
                               [tmp_path / f"{replicas}-{i}" for i in range(replicas)])
        steps_of(group, 1)
        draws = [run.batches() for run in group.runs]
        batch = {i: next(d) for i, d in enumerate(draws)}
        counter = _OpCounter()
        with counter:
            group.train_step(batch)
        counts.append(counter.kernels)
    assert counts[1] <= 1.2 * counts[0], counts


def test_replicas_refuse_torchrun_and_compile_in_one_line(tmp_path):
    from meta_llr.errors import UserError

    with pytest.raises(UserError, match="trainer.compile"):
        build_replicas(compose_config(*TINY, "replicas=2", "trainer.compile=true"), [tmp_path / "a", tmp_path / "b"])


def test_a_relaunched_sweep_sees_a_replicas_job_as_done_only_when_all_replicas_are(tmp_path):
    from meta_llr.sweep import prior_state

    for seed, status in (("s0", "finished"), ("s1", "diverged")):
        (tmp_path / seed).mkdir()
        (tmp_path / seed / "summary.json").write_text(json.dumps({"status": status}))
    assert prior_state(tmp_path)[0] == "done" and prior_state(tmp_path)[1]["status"] == "diverged"
    (tmp_path / "s1" / "summary.json").write_text(json.dumps({"status": "interrupted"}))
    assert prior_state(tmp_path)[0] == "resumed"
    (tmp_path / "s1" / "summary.json").write_text(json.dumps({"status": "failed"}))
    assert prior_state(tmp_path)[0] == "rerun"


@pytest.mark.parametrize("name", sorted(__import__("meta_llr.registry", fromlist=["available"]).available()))
def test_every_controller_as_a_replica_follows_its_single_run(name, tmp_path):
    """Replica 1 of 2 after 4 steps (an epoch boundary and its diagnostics step included) equals
    the run of its seed: each controller's state, statistics and hooks are its replica's own;
    and the batched steps make no host sync."""
    from meta_llr.registry import available

    cls = available()[name]
    options = [*TINY, "data.train_size=48", *cls.requires, f"controller={name}",
               *(f"controller.{k}={v}" for k, v in cls.example_options(tmp_path).items())]
    data = load_data(compose_config(*options).data)
    group = build_replicas(compose_config(*options, "seed=0", "replicas=2"), [tmp_path / "r0", tmp_path / "r1"],
                           data=data)
    with count_host_syncs() as syncs:  # the batched step reads nothing back from the device
        steps_of(group, 4)
    assert syncs == [], syncs
    single = build_run(compose_config(*options, "seed=1"), tmp_path / "single", data=data)
    steps_of(single, 4)
    ours = {k: v.detach() for k, v in group.runs[1].model.named_parameters()}
    theirs = {k: v.detach() for k, v in single.model.named_parameters()}
    largest = max(float(v.abs().max()) for v in theirs.values())
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-5, atol=1e-5 * largest, msg=key)
    torch.testing.assert_close(group.runs[1].trace[:4], single.trace[:4], rtol=1e-5, atol=1e-5)


def test_replicas_of_the_airbench_recipes_parts_follow_their_single_runs(tmp_path):
    """The recipe's parts are per replica too: the whitening stem fitted to the data and its bias
    frozen after its epochs, the weight average and its epoch-end resets, the BatchNorm-shift LR
    multiplier, alternating flips with reflect padding, label smoothing and TTA. Each replica's
    records over 4 epochs equal its seed's single run."""
    options = ["data=synthetic", "data.channels=3", "data.size=8", "data.classes=4", "data.train_size=96",
               "data.test_size=32", "model=fastnet", "model.widths=[8,8]", "model.whiten=true", "trainer.epochs=4",
               "trainer.batch_size=16", "quiet=true", "device=cpu", "trainer.checkpoint=false", "trainer.ema_every=2",
               "trainer.ema_start=1", "trainer.norm_lr_mult=8", "data.augment.flip=true",
               "data.augment.alternate_flip=true", "data.augment.pad_mode=reflect", "data.augment.crop_pad=2",
               "trainer.label_smoothing=0.2", "trainer.tta=2", "trainer.momentum=0.85", "trainer.nesterov=true"]
    assert train(compose_config(*options, "seed=3", "replicas=2"), tmp_path / "group")["status"] == "finished"
    for seed in (3, 4):
        train(compose_config(*options, f"seed={seed}"), tmp_path / f"single{seed}")
        rows = [[json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
                for directory in (tmp_path / "group" / f"s{seed}", tmp_path / f"single{seed}")]
        assert [row["step"] for row in rows[0]] == [row["step"] for row in rows[1]] == [6, 12, 18, 24]
        for ours, theirs in zip(*rows):
            for key in ("train_loss", "test_loss", "test_acc"):
                assert ours[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), (seed, ours["step"], key)
