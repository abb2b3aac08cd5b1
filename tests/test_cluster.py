"""Beyond one machine: sweep directories a function of the overrides, the launchers after the
plain install, and a submitit sweep in which a job preempted mid-run requeues itself and ends
bit for bit equal to an uninterrupted run, and whose relaunch runs nothing (relaunches that
rerun failed jobs: tests/test_reliability.py)."""
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from meta_llr.config import compose, run_name
from meta_llr.faults import differences
from meta_llr.run import train

ROOT = Path(__file__).resolve().parent.parent


def test_run_name_is_a_function_of_what_the_run_computes():
    base = run_name("uniform", "mlp", "digits", 3, [])
    assert base == "uniform-mlp-digits-s3"
    # Order, and keys that change nothing computed, do not change the name.
    a = run_name("uniform", "mlp", "digits", 3, ["trainer.lr=0.1", "trainer.epochs=2", "quiet=true", "seed=3",
                                                "controller=uniform", "trainer.resume=auto", "paths.root=x",
                                                "study=s", "device=cpu", "wandb.project=p"])
    b = run_name("uniform", "mlp", "digits", 3, ["trainer.epochs=2", "trainer.lr=0.1"])
    assert a == b == "uniform-mlp-digits-s3-trainer.epochs=2,trainer.lr=0.1"
    assert run_name("uniform", "mlp", "digits", 3, ["trainer.lr=0.2"]) != run_name("uniform", "mlp", "digits", 3, ["trainer.lr=0.1"])
    assert run_name("depth_linear", "mlp", "digits", 3, ["controller.first=2"]).endswith("-controller.first=2")
    long = run_name("uniform", "mlp", "digits", 0, [f"controller.x{i}=1" for i in range(20)])
    slash = run_name("uniform", "mlp", "digits", 0, ["data.path=/a/b"])
    for name in (long, slash):
        assert "/" not in name and len(name) < 60 and name.split("-")[-1].startswith("h")
    # A group choice the prefix does not name (a schedule, a controller preset) names the run.
    assert run_name("uniform", "mlp", "digits", 3, ["schedule=cosine"]) != run_name("uniform", "mlp", "digits", 3,
                                                                                     ["schedule=step"])
    assert run_name("fixed_linear", "mlp", "digits", 3, ["controller=fixed_linear_discussion"]) \
        == "fixed_linear-mlp-digits-s3-controller=fixed_linear_discussion"


def command(*argv, env=None, timeout=240):
    return subprocess.run([sys.executable, "-m", "meta_llr.train", *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, "WANDB_MODE": "disabled", **(env or {})})


def hydra_config(*overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from meta_llr.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(version_base="1.3", config_module="meta_llr.conf"):
            return hydra_compose(config_name="config", overrides=list(overrides), return_hydra_config=True).hydra
    finally:
        GlobalHydra.instance().clear()


def test_launchers_and_the_slurm_preset_compose_after_the_plain_install():
    targets = {launcher: hydra_config(f"hydra/launcher={launcher}").launcher._target_
               for launcher in ("joblib", "submitit_local", "submitit_slurm", "slurm")}
    assert targets["slurm"].endswith("SlurmLauncher") and targets["joblib"].endswith("JoblibLauncher"), targets
    launcher = hydra_config("hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=30",
                            "+hydra.launcher.additional_parameters.constraint=a100").launcher
    assert (launcher.partition, launcher.timeout_min, launcher.max_num_timeout) == ("gpu", 30, 20)
    assert launcher.additional_parameters == {"constraint": "a100"} and launcher.signal_delay_s == 120


# A hook for the job processes only (through PYTHONPATH, never in the library): hold the run of
# controller HOLD_CONTROLLER, seed 1, at step HOLD_AT until a signal has reached it, so the
# preemption lands mid-run, deterministically.
SITECUSTOMIZE = textwrap.dedent("""
    import os, time
    if os.environ.get("META_LLR_TEST_HOLD_AT"):
        from meta_llr.run import Run
        step, at = Run.train_step, int(os.environ["META_LLR_TEST_HOLD_AT"])
        def train_step(self, x, y):
            step(self, x, y)
            held = self.cfg.controller.name == os.environ["META_LLR_TEST_HOLD_CONTROLLER"] and self.cfg.seed == 1
            if held and self.step == at and not self.resumes:
                open(os.environ["META_LLR_TEST_READY"], "w").close()
                deadline = time.time() + 120
                while self.stop_signal is None and time.time() < deadline:
                    time.sleep(0.02)
        Run.train_step = train_step
""")


@pytest.mark.skipif(sys.platform != "linux", reason="submitit's local executor and signals")
def test_submitit_sweep_requeues_a_preempted_job_exactly_and_a_relaunch_runs_nothing(tmp_path):
    """2 seeds on submitit_local; one job gets SIGUSR2 mid-epoch (SLURM's
    warning before a time limit or preemption), checkpoints, requeues itself and ends bit for
    bit equal to an uninterrupted run; the same sweep relaunched launches nothing."""
    overrides = ["data=digits", "model=mlp", "model.hidden=16", "trainer.epochs=2", "trainer.batch_size=256",
                 "quiet=true", "device=cpu"]
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    ready = tmp_path / "ready"
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(hooks), str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "META_LLR_TEST_HOLD_AT": "8", "META_LLR_TEST_HOLD_CONTROLLER": "depth_linear",
           "META_LLR_TEST_READY": str(ready)}
    argv = [sys.executable, "-m", "meta_llr.train", "-m", "hydra/launcher=submitit_local", *overrides,
            "controller=depth_linear", "seed=0,1", f"paths.root={tmp_path}", "study=s"]
    sweep = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not ready.exists() and time.time() < deadline and sweep.poll() is None:
        time.sleep(0.05)
    assert ready.exists(), sweep.communicate()[1][-2000:]
    held = tmp_path / "s" / "depth_linear-mlp-digits-s1-model.hidden=16,trainer.batch_size=256,trainer.epochs=2"
    os.kill(int((held / ".lock").read_text()), 12)  # SIGUSR2
    _, err = sweep.communicate(timeout=300)
    assert sweep.returncode == 0, err[-2000:]
    assert "2 jobs: 2 finished" in err, err[-1500:]
    summary = json.loads((held / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["resumes"][0]["from_step"] == 8, summary.get("resumes")
    reference = tmp_path / "reference"
    train(compose([*overrides, "controller=depth_linear", "seed=1"]), reference)
    assert differences(held, reference) == []

    again = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "2 jobs: 2 finished (2 skipped (already over))" in again.stderr, again.stderr[-1500:]
