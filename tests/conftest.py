"""Shared fixtures: compose the real Hydra config the CLI uses, run short trainings, and run the
command line (``train_cli``) the way a user does, without paying torch's import per command."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# pytest-xdist runs one worker per core (pyproject's addopts); intra-op threads would only contend.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

# A few-step synthetic run: big enough to exercise every code path, small enough for CI.
TINY = ["data=synthetic", "data.channels=1", "data.size=8", "data.classes=4", "data.train_size=64",
        "data.test_size=32", "model=mlp", "model.hidden=16", "trainer.epochs=2", "trainer.batch_size=16",
        "quiet=true", "trainer.checkpoint=false", "device=cpu"]


def compose_config(*overrides):
    """The checked config of ``overrides``, exactly as the CLI composes it."""
    from meta_llr.config import compose

    return compose(overrides)


@pytest.fixture
def one_thread():
    """Tiny ops (the RNN learner, quadratics): intra-op threads only add contention."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_config():
    return compose_config


@pytest.fixture
def tiny_run(tmp_path):
    """Train a tiny synthetic run with extra overrides; returns (summary, run_dir)."""
    from meta_llr.run import train

    def run(*overrides, name="run"):
        cfg = compose_config(*TINY, *overrides)
        out = tmp_path / name
        return train(cfg, out), out

    return run


# One process imports meta_llr.train (torch, Hydra, every controller) once; each command runs in a
# fork of it that has not run Hydra yet, its stdout and stderr in files, and exits with the code
# ``python -m meta_llr.train ARGS`` would (SystemExit's; 1 and the traceback for anything else).
# A command runs as a fresh process would run it, ~0.3 s instead of ~4 s of imports.
FORK_SERVER = r"""
import json, os, signal, sys, tempfile, traceback
import meta_llr.train
script = meta_llr.train.__file__
for line in sys.stdin:
    request = json.loads(line)
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.alarm(request["timeout"])
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            os.chdir(request["cwd"])
            os.environ.update(request["env"])
            sys.argv = [script, *request["args"]]
            meta_llr.train.main()
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    texts = []
    for f in (out, err):
        f.seek(0)
        texts.append(f.read().decode(errors="replace"))
        f.close()
    print(json.dumps({"returncode": os.waitstatus_to_exitcode(status), "stdout": texts[0], "stderr": texts[1]}),
          flush=True)
"""


@pytest.fixture(scope="session")
def train_cli():
    """``train_cli(*args, cwd=None, env=None, timeout=300)`` -> ``subprocess.CompletedProcess`` of
    ``python -m meta_llr.train ARGS`` (with WANDB_MODE=disabled, HYDRA_FULL_ERROR=0)."""
    env = dict(os.environ, WANDB_MODE="disabled", HYDRA_FULL_ERROR="0")
    server = subprocess.Popen([sys.executable, "-c", FORK_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, cwd=ROOT, env=env)

    def run(*args, cwd=None, env=None, timeout=300):
        request = {"args": [str(a) for a in args], "cwd": str(cwd or ROOT), "env": env or {}, "timeout": timeout}
        server.stdin.write(json.dumps(request) + "\n")
        server.stdin.flush()
        line = server.stdout.readline()
        assert line, "the fork server died"
        reply = json.loads(line)
        return subprocess.CompletedProcess(list(args), reply["returncode"], reply["stdout"], reply["stderr"])

    yield run
    server.stdin.close()
    server.wait(timeout=60)
