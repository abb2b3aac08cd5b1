"""The controller contract, checked for every registered controller (present and future)."""
import contextlib
import io

import pytest
import torch

from meta_llr.interface import STATS, Controller
from meta_llr.registry import available
from meta_llr.run import build_run
from tests.conftest import TINY, compose_config

REGISTRY = available()
SYNCING = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def count_host_syncs():
    """Record every call that would copy a device value to the host (a sync on CUDA)."""
    calls = []
    originals = {name: getattr(torch.Tensor, name) for name in SYNCING}

    def spy(name):
        def method(self, *args, **kwargs):
            calls.append(name)
            return originals[name](self, *args, **kwargs)
        return method

    for name in SYNCING:
        setattr(torch.Tensor, name, spy(name))
    try:
        yield calls
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)


def test_every_controller_has_a_config_and_every_config_a_controller():
    from meta_llr.config import group_options

    choices, registry = group_options("controller"), available()
    assert set(registry) <= set(choices), f"controllers without a config: {set(registry) - set(choices)}"
    for name in choices:
        if name == "replay":
            continue  # needs a curve file; test_export composes it with one
        cfg = compose_config(f"controller={name}")
        assert cfg.controller.name in registry, f"controller={name} names unknown controller {cfg.controller.name}"


def test_every_controller_documents_its_formula():
    for name, cls in REGISTRY.items():
        doc = (cls.__doc__ or "") + (__import__(cls.__module__).__doc__ or "")
        assert len(doc.strip()) > 40, f"controller {name} has no docstring with its formula and source"


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_contract(name, tmp_path, monkeypatch):
    example = REGISTRY[name].example_options(tmp_path)  # e.g. a file to read
    cfg = compose_config(*TINY, "trainer.trace_every=1", *REGISTRY[name].requires, f"controller={name}",
                         *(f"controller.{k}={v}" for k, v in example.items()))
    run = build_run(cfg, tmp_path)
    controller = run.controller
    assert isinstance(controller, Controller)
    assert set(controller.needs) <= STATS
    num_layers = len(run.layers)

    seen_stats = []
    original_observe = controller.observe

    def observe(step, stats):
        seen_stats.append(set(stats))
        return original_observe(step, stats)

    monkeypatch.setattr(controller, "observe", observe)
    used = []  # what scales(step) returned, as it was at that moment
    original_scales = controller.scales

    def scales_spy(step):
        scales = original_scales(step)
        used.append(scales.clone())
        return scales

    monkeypatch.setattr(controller, "scales", scales_spy)
    stepped = []  # what the optimizer step was given: (scales, global LR)
    original_step = run.flat_step.step

    def step_spy(scales, global_lr):
        stepped.append((scales.clone(), global_lr))
        return original_step(scales, global_lr)

    monkeypatch.setattr(run.flat_step, "step", step_spy)
    steps_checked = 0
    for x, y in run.batches():
        step = run.step
        mask = controller.trainable(step)
        if mask is not None:
            assert len(mask) == num_layers and any(mask), "at least one layer must train"
        with count_host_syncs() as syncs:
            run.train_step(x, y)
        assert syncs == [], f"host-device syncs inside the step: {syncs}"
        assert len(used) == steps_checked + 1, "the loop calls scales(step) exactly once per step"
        scales = used[-1]
        assert isinstance(scales, torch.Tensor) and scales.shape == (num_layers,)
        assert scales.dtype == torch.float32 and scales.device == run.device
        assert torch.isfinite(scales).all() and (scales >= 0).all()
        zero = (scales == 0).tolist()
        if any(zero):
            assert mask is not None and all(not m for m, z in zip(mask, zero) if z), \
                "a zero scale is only allowed for a layer reported frozen by trainable()"
        # The trace is the truth: its row is the scales used, and so are the optimizer's LRs.
        assert torch.equal(run.trace[step], scales), "llr.csv must hold the scales used at this step"
        given, global_lr = stepped[-1]
        assert torch.equal(given, scales), "the optimizer must step with the scales scales(step) returned"
        assert global_lr == float(run.plan.lr_table[step]), "the optimizer's global LR must be global_lr(step)"
        steps_checked += 1
    assert steps_checked == run.steps_per_epoch
    for keys in seen_stats:
        assert set(controller.needs) <= keys

    # state_dict round trip: a fresh controller restored from a serialised state holds the
    # same state, and (with this step's gradients in place) gives the same scales.
    state = controller.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restored = type(controller)(**{k: v for k, v in cfg.controller.items() if k != "name"})
    restored.setup(run.layers, run.plan)
    restored.load_state_dict(torch.load(buffer, weights_only=False))
    assert_same_state(restored.state_dict(), state)
    x, y = next(iter(run.batches()))
    run._loss_fn(run.model(run.normalize(x)), y).backward()
    restored.stats = controller.stats = {}
    assert torch.equal(restored.scales(run.step), controller.scales(run.step))


def assert_same_state(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a.cpu(), b.cpu()), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b)):
            assert_same_state(u, v, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), where
