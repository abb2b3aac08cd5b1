"""Data-parallel runs under torchrun (gloo, 2 CPU processes, one launch for all checks):

* for ``uniform``, ``hessian_secant``, ``hypergrad`` and ``rnn_meta``, a 2-rank run gives the
  metrics of the same run in one process (same global batch) within float tolerance, and the
  per-layer scales used by both ranks are bitwise identical at every step, as are their weights;
* only rank 0 writes; ``summary.json`` and ``env.json`` record ``world_size``;
* a run stopped after its first epoch and resumed under torchrun ends bit for bit equal to the
  uninterrupted torchrun run.
"""
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from meta_llr.config import compose
from meta_llr.faults import differences
from meta_llr.records import read_jsonl
from meta_llr.run import train

ROOT = Path(__file__).resolve().parent.parent
CONTROLLERS = ("uniform", "hessian_secant", "hypergrad", "rnn_meta")
# Every global batch splits evenly over 2 ranks (512 = 8 × 64), so a rank-averaged gradient is
# the global batch's mean gradient; the mlp has no BatchNorm (per-rank batch statistics).
OVERRIDES = ["data=synthetic", "data.channels=1", "data.size=8", "data.classes=4", "data.train_size=512",
             "data.test_size=128", "model=mlp", "model.hidden=32", "trainer.epochs=2", "trainer.batch_size=64",
             "trainer.trace_every=1", "quiet=true", "device=cpu", "controller.interval=2"]

# Run under torchrun: every controller into its own directory, each rank saving the scales it
# applied at every step and its final weights; then hessian_secant stopped after epoch 1
# (its newest checkpoint and summary gone) and resumed with trainer.resume=auto.
DRIVER = textwrap.dedent("""
    import shutil, sys, torch
    from pathlib import Path
    from meta_llr import checkpoint
    from meta_llr.config import compose
    from meta_llr.run import build_run, resume_if_asked

    out, controllers, overrides = Path(sys.argv[1]), sys.argv[2].split(","), sys.argv[3:]

    def run(directory, *extra):
        run = build_run(compose([*overrides, *extra]), directory)
        done = resume_if_asked(run)
        if done is None:
            run.fit()
        torch.save({"trace": run.trace, "weights": [p.detach() for p in run.model.parameters()]},
                   out / f"{directory.name}-rank{run.dist.rank}.pt")
        return run

    for name in controllers:
        options = ["controller.interval=2"] if name == "hessian_secant" else []
        last = run(out / name, f"controller={name}", *options)
    if last.dist.main:
        shutil.copytree(out / "hessian_secant", out / "resumed", ignore=shutil.ignore_patterns(".lock"))
        newest = checkpoint.checkpoints(out / "resumed")[0]
        newest.unlink()
        checkpoint.digest_path(newest).unlink()
        (out / "resumed" / "summary.json").unlink()
    last.dist.barrier()
    run(out / "resumed", "controller=hessian_secant", "controller.interval=2", "trainer.resume=auto")
""")


def base(controller):
    return [o for o in OVERRIDES if not o.startswith("controller.")] + [f"controller={controller}"] + \
        (["controller.interval=2"] if controller == "hessian_secant" else [])


@pytest.mark.skipif(sys.platform != "linux", reason="gloo process groups on Linux CI")
def test_two_ranks_equal_one_process_and_each_other_and_resume_bit_for_bit(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    overrides = [o for o in OVERRIDES if not o.startswith("controller.")]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(driver), str(tmp_path), ",".join(CONTROLLERS), *overrides],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-3000:]

    for name in CONTROLLERS:
        ranks = [torch.load(tmp_path / f"{name}-rank{r}.pt") for r in (0, 1)]
        assert torch.equal(ranks[0]["trace"], ranks[1]["trace"]), f"{name}: the ranks applied different scales"
        assert all(torch.equal(a, b) for a, b in zip(ranks[0]["weights"], ranks[1]["weights"])), name
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["status"] == "finished" and summary["world_size"] == 2, name
        assert json.loads((tmp_path / name / "env.json").read_text())["world_size"] == 2
        single = tmp_path / f"single-{name}"
        train(compose(base(name)), single)
        for a, b in zip(read_jsonl(tmp_path / name / "metrics.jsonl"), read_jsonl(single / "metrics.jsonl")):
            assert a["step"] == b["step"]
            for key in ("train_loss", "test_loss"):
                assert math.isclose(a[key], b[key], rel_tol=1e-4), (name, key, a[key], b[key])
            assert abs(a["test_acc"] - b["test_acc"]) <= 1 / 128 + 1e-12, (name, a["test_acc"], b["test_acc"])
        if name != "uniform":  # the scales themselves, per step (uniform: all ones)
            single_trace = torch.tensor([[float(v) for v in line.split(",")[3:]] for line in
                                         (single / "llr.csv").read_text().splitlines()[1:]])
            assert torch.allclose(ranks[0]["trace"], single_trace, rtol=1e-3, atol=1e-6), name

    resumed = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert resumed["resumes"][0]["from_step"] == 8 and resumed["world_size"] == 2
    assert differences(tmp_path / "resumed", tmp_path / "hessian_secant") == []
    assert len(read_jsonl(tmp_path / "resumed" / "metrics.jsonl")) == 2  # one writer: one row per epoch
