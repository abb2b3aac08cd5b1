"""Data-parallel runs under torchrun (gloo, 2 CPU processes): every rank ends with the same
weights (identical per-layer scales, even for a controller that measures curvature on its
own shard), only rank 0 writes, summary and env record world_size, and a resume under
torchrun continues bit for bit."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from meta_llr import checkpoint
from meta_llr.faults import differences

ROOT = Path(__file__).resolve().parent.parent
OVERRIDES = ["data=digits", "model=mlp", "trainer.epochs=2", "trainer.batch_size=128",
             "device=cpu", "quiet=true", "controller=hessian_secant", "controller.interval=3"]

# Each rank writes a digest of its final weights (test-only, through PYTHONPATH).
SITECUSTOMIZE = textwrap.dedent("""
    import hashlib, os
    from meta_llr.run import Run
    fit = Run.fit
    def fit_and_record(self):
        try:
            return fit(self)
        finally:
            digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in self.model.parameters()))
            (self.records.dir / f"weights-rank{self.dist.rank}.sha256").write_text(digest.hexdigest())
    Run.fit = fit_and_record
""")


def torchrun(run_dir, hooks, *extra):
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(hooks), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "meta_llr.train", *OVERRIDES, f"hydra.run.dir={run_dir}", *extra],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


@pytest.mark.skipif(sys.platform != "linux", reason="gloo process groups on Linux CI")
def test_two_ranks_train_identically_and_resume_bit_for_bit(tmp_path):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    first = tmp_path / "first"
    done = torchrun(first, hooks)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((first / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["world_size"] == 2 and summary["final_test_acc"] > 0.8
    assert json.loads((first / "env.json").read_text())["world_size"] == 2
    assert len((first / "metrics.jsonl").read_text().splitlines()) == 2  # one writer: one row per epoch
    assert (first / "weights-rank0.sha256").read_text() == (first / "weights-rank1.sha256").read_text()

    # Stopped after epoch 1: the last checkpoint and the summary gone; resumed under torchrun.
    resumed = tmp_path / "resumed"
    shutil.copytree(first, resumed)
    newest = checkpoint.checkpoints(resumed)[0]
    newest.unlink()
    checkpoint.digest_path(newest).unlink()
    (resumed / "summary.json").unlink()
    done = torchrun(resumed, hooks, "trainer.resume=auto")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((resumed / "summary.json").read_text())["resumes"][0]["from_step"] == 12
    assert differences(resumed, first) == []
    assert (resumed / "weights-rank0.sha256").read_text() == (first / "weights-rank0.sha256").read_text()
