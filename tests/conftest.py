"""Shared fixtures: compose the real Hydra config the CLI uses, and run short trainings."""
import os

import pytest

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
