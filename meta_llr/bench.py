"""Benchmark: the framework's training step against a bare PyTorch loop, in one process.

    python -m meta_llr.bench --device cpu --models fastnet,resnet
    python -m meta_llr.bench --device cuda --models fastnet,resnet56 --controllers uniform,lars
    python -m meta_llr.bench --device cuda --sync-check          # 50 steps per controller, sync = error

Variants, all on the same model (same seed, same initial weights), the same pre-drawn
batches already on the device, the same optimizer hyper-parameters:

* ``bare``: the loop a researcher writes by hand (:class:`BareLoop`): normalise, forward,
  cross-entropy, backward, ``torch.optim.SGD(momentum, nesterov, weight_decay, fused=True)``
  with ONE param group and a Python-float LR, ``zero_grad(set_to_none=True)``. No controller,
  no statistics, no records. Fused because the framework's optimizer is fused too: the
  comparison then measures only what the framework adds (per-layer groups with tensor LRs,
  controller, statistics, accumulators), not a different SGD kernel.
* the framework's ``Run.train_step`` with ``uniform`` and with every registered controller,
  each ``Run`` built from the real config (``controller=NAME`` with its defaults).

Under ``torchrun --nproc_per_node=N -m meta_llr.bench ...`` the framework's variants are DDP
runs (:mod:`meta_llr.distributed`): each rank steps on its shard of the same global batch,
``bare`` stays one process on the whole batch, and every row records ``world_size`` (the DDP
row: the ratio is a data-parallel step against a one-process step). Rank 0 writes bench.json.

Timing: variants are interleaved (round-robin blocks of ``--block`` steps, the starting
variant rotating each round, and a block of ``bare`` right before every variant's block) so
that drifting machine load hits all of them alike; the first
``--warmup`` steps of each variant are discarded; the Python garbage collector is paused
inside timed blocks (and run between them) for every variant alike. CPU steps are timed with
``time.perf_counter``; CUDA steps with ``torch.cuda.Event`` pairs recorded around each step and
one synchronisation after each block (none inside it). Reported: the median and p10/p90 of
the per-step times, images/s from the median, ``ratio_to_bare`` (median / bare's median) and
``ratio_paired`` (median over rounds of the variant's block time / the time of the bare
block just before it, robust to drifts of the machine's speed) with ``ratio_paired_ci95``,
the distribution-free 95% confidence interval of that median (binomial order statistics,
``meta_llr.stats.median_ci``; needs >= 6 rounds). Percentiles: ``numpy.percentile`` (linear
interpolation). The target
applies to ``ratio_to_bare``; ``verdict`` is ``met`` when it is within the target, ``missed``
when it is over and the whole interval lies above the target, ``within noise`` when it is over
but the interval includes the target (the machine's noise exceeds the difference: more
``--steps`` narrow it). ``meets_target`` stays the plain comparison.

Launch work, per variant: ``kernel_ops`` = ATen ops dispatched in one ordinary training step
(counted below autograd with a ``TorchDispatchMode``, views and ``detach`` apart in
``view_ops``), ``extra_kernel_ops`` = that minus bare's. On a GPU each is about one kernel
launch, a few microseconds of host time the step cannot hide when it is short; the count is
exact and the same on any machine, so it shows launch overhead where no GPU is at hand.
``extra_kernel_ops_mean`` is the mean of the same difference over the next ``--ops-steps`` (20)
ordinary steps: the per-step share of work a controller does every k steps (``hessian_secant``'s
probe, ``rnn_meta``'s meta step), which the one counted step may miss. (A
``torch._foreach_*`` op counts once even where it falls back to one kernel per tensor, and
``cat`` of more than 128 tensors is one op but several launches; torch.optim's profiler markers
are not counted: they launch nothing.) Targets (``ops_target``, ``meets_ops``), whatever the
depth: at most 6 extra ops for ``uniform`` and the baselines, 40 for adaptive controllers,
60 for ``rnn_meta``, on the one counted step.

Memory, per variant: ``extra_state_bytes`` counts, once per storage, the tensors reachable
from ``controller.state_dict()`` and the controller's attributes (lists, tuples, dicts
followed) that are not the model's parameters, their gradients or the LR table, plus the
loop's buffer ``Run.prev`` that exists because of what the controller needs (the weights
before the step / the last update). It is compared with ``param_bytes`` (the model's trainable
parameters); the target is at most 2x (plus 1 KiB per layer for per-layer scalars: Adam moments
are exactly 2x and their per-layer bookkeeping must not fail them). Not counted: momentum buffers (bare has them too) and
the diagnostics' copy of the initial kernels (framework state, same for every controller).
The runs' plan is that of a ``--plan-epochs`` (200) epoch run, so a controller that keeps a
per-step ``[steps, layers]`` table is charged for the table of a real run.
On CUDA ``peak_mem_bytes`` is ``torch.cuda.max_memory_allocated`` during the variant's
steps minus what was allocated before them (activations, gradients, temporaries of one step)
plus the variant's resident training state (parameters, momentum, extra state).

Targets (ratio of medians to ``bare``): ``uniform`` and hand-crafted baselines (the
``baselines`` package) 1.03; ``hessian_secant``, ``adam_probe``, ``layca``, ``lars``,
``hypergrad`` and any other adaptive controller 1.10; ``rnn_meta`` (online) 1.25.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from meta_llr.errors import UserError
from meta_llr.stats import median_ci

RATIO_BASELINE, RATIO_ADAPTIVE = 1.03, 1.10
RATIO_BY_NAME = {"uniform": 1.03, "hessian_secant": 1.10, "adam_probe": 1.10, "layca": 1.10, "lars": 1.10,
                 "hypergrad": 1.10, "rnn_meta": 1.25}
# Extra kernel ops per step over bare, whatever the depth (issue 16): the loop's own work for
# uniform and the closed-form baselines, plus a controller's per-step work for the others.
OPS_BASELINE, OPS_ADAPTIVE = 6, 40
OPS_BY_NAME = {"rnn_meta": 60}
MEMORY_RATIO = 2.0
MEMORY_PER_LAYER = 1024  # bytes of allowance per layer for per-layer scalars on top of 2x the parameters
# Options a controller is benchmarked with, where it has them (the setting).
BENCH_OVERRIDES = {"rnn_meta": {"learn": "online"}}
SYNC_CHECK_STEPS = 50
OPS_STEPS = 20  # covers hessian_secant's probe interval (10) and rnn_meta's meta-step window (4)
DEFAULTS = {"cpu": dict(batch=256, steps=8, warmup=1, block=1),
            "cuda": dict(batch=512, steps=100, warmup=10, block=10)}
CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}
PLAN_EPOCHS = 200
MAX_PLAN_STEPS = 100_000  # caps the plan for tiny batches (per-step tables grow with it)
SYNTHETIC_TRAIN_SIZE = 50_000  # CIFAR-10's: the once-per-epoch diagnostics step comes at its real rate


def ratio_target(name: str, cls) -> float:
    if name in RATIO_BY_NAME:
        return RATIO_BY_NAME[name]
    return RATIO_BASELINE if cls.__module__.startswith("baselines.") else RATIO_ADAPTIVE


# ----------------------------------------------------------------------------- config
def ops_target(name: str, cls) -> int:
    if name in OPS_BY_NAME:
        return OPS_BY_NAME[name]
    return OPS_BASELINE if cls.__module__.startswith("baselines.") else OPS_ADAPTIVE


def compose_config(overrides: list[str]):
    from meta_llr.config import compose

    return compose(overrides)


def model_overrides(name: str) -> list[str]:
    """``fastnet``, ``resnet`` (20), ``resnetN`` (ResNet-N, e.g. ``resnet56``) or any registered model."""
    from meta_llr.config import group_options

    yamls = set(group_options("model"))
    if name in yamls:
        return [f"model={name}"]
    if name.startswith("resnet") and name[6:].isdigit():
        return ["model=resnet", f"model.depth={int(name[6:])}"]
    raise UserError(f"unknown model '{name}'; valid: {', '.join(sorted(yamls))} or resnetN (e.g. resnet56)")


def data_overrides(data: str, synthetic_size: int = SYNTHETIC_TRAIN_SIZE) -> list[str]:
    if data == "synthetic":
        return ["data=synthetic", f"data.train_size={synthetic_size}", "data.test_size=16"]
    if not Path(data).exists():
        raise UserError(f"--data {data}: no such path; give an image-folder tree (train/, test/) or 'synthetic'")
    return ["data=imagefolder", f"data.path={Path(data).resolve()}"]


def controller_overrides(name: str, cls, workdir: Path) -> list[str]:
    """The bench's setting for ``name`` (where the controller has the option), plus what a
    controller needs to run at all: ``Controller.example_options`` (e.g. a file to read) and the
    overrides it ``requires`` (lamb: AdamW, so its ratio to the SGD bare loop includes AdamW's cost)."""
    import dataclasses

    from meta_llr.registry import CONTROLLER_CONFIGS

    keys = {f.name for f in dataclasses.fields(CONTROLLER_CONFIGS[name])}
    options = {k: v for k, v in BENCH_OVERRIDES.get(name, {}).items() if k in keys}
    example = getattr(cls, "example_options", None)
    if example is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        options.update(example(workdir))
    return [*cls.requires, *(f"controller.{k}={v}" for k, v in options.items())]


# ----------------------------------------------------------------------------- the yardstick
class BareLoop:
    """The hand-written loop: same model, normalisation, precision; one fused SGD group."""

    def __init__(self, model: torch.nn.Module, mean, std, channels_last: bool, autocast, trainer):
        self.model, self.mean, self.std = model, mean, std
        self.channels_last, self.autocast = channels_last, autocast
        self.label_smoothing = float(trainer.label_smoothing)
        nesterov = bool(trainer.nesterov and trainer.momentum > 0)
        self.optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=float(trainer.lr),
                                         momentum=trainer.momentum, nesterov=nesterov,
                                         weight_decay=trainer.weight_decay, fused=True)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = (x.float() - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            loss = F.cross_entropy(self.model(x).float(), y, label_smoothing=self.label_smoothing)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- memory
def storage_bytes(tensors) -> dict[int, int]:
    out = {}
    for t in tensors:
        storage = t.untyped_storage()
        out[storage.data_ptr()] = storage.nbytes()
    return out


def reachable_tensors(obj, depth: int = 0, seen: set | None = None):
    """Tensors in ``obj``, following dicts, lists, tuples and plain attribute objects."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 6:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from reachable_tensors(value, depth + 1, seen)
    elif isinstance(obj, (list, tuple, set)):
        for value in obj:
            yield from reachable_tensors(value, depth + 1, seen)
    elif isinstance(obj, torch.nn.Module):
        yield from obj.parameters()
        yield from obj.buffers()
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        yield from reachable_tensors(vars(obj), depth + 1, seen)


def extra_state_bytes(run) -> int:
    """Bytes of the controller's tensors and the loop's ``prev`` buffer (see module docstring).

    The controller's attributes and its ``state_dict()`` are counted separately and the larger
    is kept: a ``state_dict`` that returns copies must not count its tensors twice."""
    from meta_llr.interface import Layer, Plan

    controller = run.controller
    own = [p for p in run.model.parameters()] + [p.grad for p in run.model.parameters() if p.grad is not None]
    own.append(run.plan.lr_table)
    exclude = set(storage_bytes(own))
    attributes = {k: v for k, v in vars(controller).items() if not isinstance(v, (Layer, Plan))
                  and k not in ("layers", "plan")}
    loop = storage_bytes(run.prev) if run.prev is not None else {}

    def total(tensors) -> int:
        found = {**storage_bytes(tensors), **loop}
        return sum(n for ptr, n in found.items() if ptr not in exclude)

    return max(total(reachable_tensors(attributes)), total(reachable_tensors(controller.state_dict())))


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def resident_bytes(params, optimizer, extra: int) -> int:
    momentum = sum(t.numel() * t.element_size() for state in optimizer.state.values()
                   for t in state.values() if isinstance(t, torch.Tensor))
    return sum(p.numel() * p.element_size() for p in params) + momentum + extra


# ----------------------------------------------------------------------------- timing
@dataclasses.dataclass
class Variant:
    name: str
    step: callable
    target: float | None = None
    ops_target: int | None = None
    times_ms: list = dataclasses.field(default_factory=list)
    block_ms: list = dataclasses.field(default_factory=list)   # per round, for the paired ratio
    reference_ms: list = dataclasses.field(default_factory=list)  # bare's block just before each of them
    transient_peak: int = 0
    ops: tuple = (0, 0)           # (kernel ops, view ops) of one step, from count_ops
    ops_mean: float = 0.0         # kernel ops per step, mean over --ops-steps more steps
    run: object = None
    bare: BareLoop | None = None


def time_block(variant: Variant, batches, start: int, count: int, device: torch.device,
               clock=time.perf_counter) -> list[float]:
    """Run ``count`` steps of ``variant``; per-step milliseconds, with no sync inside the block."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        events = [torch.cuda.Event(enable_timing=True) for _ in range(count + 1)]
    gc.collect()
    gc.disable()
    try:
        if cuda:
            events[0].record()
            for i in range(count):
                x, y = batches[(start + i) % len(batches)]
                variant.step(x, y)
                events[i + 1].record()
            torch.cuda.synchronize(device)
            times = [a.elapsed_time(b) for a, b in zip(events, events[1:])]
            variant.transient_peak = max(variant.transient_peak, torch.cuda.max_memory_allocated(device) - base)
        else:
            times = []
            for i in range(count):
                x, y = batches[(start + i) % len(batches)]
                t0 = clock()
                variant.step(x, y)
                times.append((clock() - t0) * 1e3)
    finally:
        gc.enable()
    return times


# ----------------------------------------------------------------------------- building
def build_variants(model_name: str, controllers: list[str], args, registry, workdir: Path):
    from meta_llr.data import Split, load_data
    from meta_llr.run import build_run

    base = [*data_overrides(args.data, args.synthetic_size), *model_overrides(model_name),
            f"device={args.device}", "quiet=true",
            f"trainer.batch_size={args.batch}", "trainer.checkpoint=false", "logger=[csv]"]
    # The plan of a real run (per-step tables are sized by it), long enough for every step the bench takes.
    first = compose_config([*base, "controller=uniform"])
    data = load_data(first.data)  # loaded once, on the device once: every variant trains on these tensors
    device = torch.device(args.device)
    for split in ("train", "test", "val"):
        if getattr(data, split) is not None:
            setattr(data, split, Split(getattr(data, split).x.to(device), getattr(data, split).y.to(device)))
    steps_per_epoch = math.ceil(len(data.train) / args.batch)
    steps_needed = args.warmup + args.steps + SYNC_CHECK_STEPS + 1
    plan_epochs = min(args.plan_epochs, math.ceil(MAX_PLAN_STEPS / steps_per_epoch))
    base.append(f"trainer.epochs={max(plan_epochs, math.ceil(steps_needed / steps_per_epoch) + 1)}")
    probe = build_run(compose_config([*base, "controller=uniform"]), workdir / "bare", data=data)
    bare = BareLoop(probe.model, probe.mean, probe.std, probe.channels_last, probe.autocast, probe.cfg.trainer)
    variants = [Variant("bare", bare.step, bare=bare, run=probe)]
    for name in controllers:
        cfg = compose_config([*base, f"controller={name}", *controller_overrides(name, registry[name], workdir / name)])
        run = build_run(cfg, workdir / name, data=data)
        run.eval_splits = {}
        def sharded(x, y, run=run):  # under torchrun: each rank steps on its shard of the global batch
            run.train_step(run.dist.shard(x), run.dist.shard(y))

        step = sharded if run.dist.active else run.train_step
        target = None if run.dist.active else ratio_target(name, registry[name])  # targets are one-process
        variants.append(Variant(name, step, target, ops_target(name, registry[name]), run=run))
    # The same pre-drawn, augmented batches for every variant.
    gen = torch.Generator(device=probe.device).manual_seed(1)
    batches = []
    for i in range(4):
        index = torch.randint(0, len(probe.train_y), (args.batch,), generator=gen, device=probe.device)
        batches.append((probe.augment(index, gen), probe.train_y[index]))
    return variants, batches, probe


def measure(model_name: str, controllers: list[str], args, registry, workdir: Path) -> list[dict]:
    device = torch.device(args.device)
    started = time.perf_counter()
    variants, batches, probe = build_variants(model_name, controllers, args, registry, workdir)
    print(f"[{model_name}] {len(probe.layers)} layers, {param_bytes(probe.model) / 2**20:.2f} MiB of parameters; "
          f"{len(variants)} variants built in {time.perf_counter() - started:.1f} s", flush=True)
    for variant in variants:
        time_block(variant, batches, 0, args.warmup, device)
    rounds = math.ceil(args.steps / args.block)
    round_started = time.perf_counter()
    bare, others = variants[0], variants[1:]
    for r in range(rounds):
        count, start, clock = min(args.block, args.steps - r * args.block), args.warmup + r * args.block, CLOCKS[args.clock]
        for k in range(len(others)):
            variant = others[(k + r) % len(others)]
            # a bare block right before each variant's block: the paired ratio compares
            # neighbours in time, so slow drifts of the machine's speed cancel
            reference = time_block(bare, batches, start, count, device, clock)
            bare.times_ms.extend(reference)
            bare.block_ms.append(sum(reference))
            bare.reference_ms.append(sum(reference))
            times = time_block(variant, batches, start, count, device, clock)
            variant.times_ms.extend(times)
            variant.block_ms.append(sum(times))
            variant.reference_ms.append(sum(reference))
        elapsed = time.perf_counter() - round_started
        print(f"[{model_name}] round {r + 1}/{rounds} done, {elapsed:.0f} s, "
              f"about {elapsed / (r + 1) * (rounds - r - 1):.0f} s left", flush=True)
    for variant in variants:
        variant.ops = count_ops(variant, batches)
        variant.ops_mean = float(np.mean([count_ops(variant, batches)[0] for _ in range(args.ops_steps)]))
    return rows_for(model_name, variants, args, probe)


class _OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched below autograd: ``kernels`` (on a GPU, about one launch
    each) and ``views`` (metadata only: views, detach, reshapes without a copy)."""

    def __init__(self):
        super().__init__()
        self.kernels = self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.is_view:
            self.views += 1
        elif func.namespace != "profiler":  # torch.optim's record_function markers launch nothing
            self.kernels += 1
        return func(*args, **(kwargs or {}))


def count_ops(variant: Variant, batches) -> tuple[int, int]:
    """(kernel ops, view ops) of one ordinary training step (not an end-of-epoch probe step):
    the device-independent measure of the per-step launch work, exact on any machine. The
    per-layer reductions (``PerLayer``) of the loop and the controller take their GPU form
    meanwhile (``fused``: a fixed number of launches), the form whose launches matter."""
    from meta_llr.per_layer import PerLayer

    run = variant.run if variant.bare is None else None
    if run is not None and (run.step + 1) % run.steps_per_epoch == 0:
        variant.step(*batches[0])
    holders = [run, run.controller] if run is not None else []
    reducers = [value for holder in holders for value in vars(holder).values() if isinstance(value, PerLayer)]
    modes = [reducer.fused for reducer in reducers]
    counter = _OpCounter()
    try:
        for reducer in reducers:
            reducer.fused = True
        with counter:
            variant.step(*batches[0])
    finally:
        for reducer, mode in zip(reducers, modes):
            reducer.fused = mode
    return counter.kernels, counter.views


def rows_for(model_name, variants, args, probe) -> list[dict]:
    device = torch.device(args.device)
    bare = variants[0]
    bare_median = float(np.percentile(bare.times_ms, 50))
    pbytes = param_bytes(probe.model)
    rows, bare_ops, bare_mean = [], bare.ops[0], bare.ops_mean
    for variant in variants:
        kernel_ops, view_ops = variant.ops
        p10, median, p90 = (float(v) for v in np.percentile(variant.times_ms, [10, 50, 90]))
        ratio = median / bare_median
        pairs = [a / b for a, b in zip(variant.block_ms, variant.reference_ms)]
        paired, ci = float(np.percentile(pairs, 50)), median_ci(pairs)
        if variant.target is None:
            verdict = None
        elif ratio <= variant.target:
            verdict = "met"
        else:  # over the target: by more than the noise only if the whole CI is above it
            verdict = "within noise" if ci is None or ci[0] <= variant.target else "missed"
        if variant.bare is not None:
            extra, params, optimizer = 0, list(variant.bare.model.parameters()), variant.bare.optimizer
        else:
            extra, params, optimizer = extra_state_bytes(variant.run), variant.run.params, variant.run.optimizer
        row = {
            "model": model_name, "controller": variant.name, "device": device.type, "batch": args.batch,
            "world_size": probe.dist.world_size,
            "clock": args.clock if device.type == "cpu" else "cuda_event", "threads": torch.get_num_threads(),
            "layers": len(probe.layers), "steps_timed": len(variant.times_ms),
            "step_ms_median": round(median, 3), "step_ms_p10": round(p10, 3), "step_ms_p90": round(p90, 3),
            "images_per_s": round(args.batch / (median / 1e3), 1),
            "ratio_to_bare": round(ratio, 4), "ratio_paired": round(paired, 4),
            "ratio_paired_ci95": None if ci is None else [round(ci[0], 4), round(ci[1], 4)], "verdict": verdict,
            "block_ratios": [round(r, 5) for r in pairs],
            "kernel_ops": kernel_ops, "extra_kernel_ops": kernel_ops - bare_ops, "view_ops": view_ops,
            "extra_kernel_ops_mean": round(variant.ops_mean - bare_mean, 2), "ops_steps": args.ops_steps,
            "param_groups": len(optimizer.param_groups), "ops_target": variant.ops_target,
            "meets_ops": None if variant.ops_target is None else kernel_ops - bare_ops <= variant.ops_target,
            "target": variant.target, "meets_target": None if variant.target is None else ratio <= variant.target,
            "extra_state_bytes": extra, "param_bytes": pbytes, "extra_state_ratio": round(extra / pbytes, 4),
            "meets_memory": extra <= MEMORY_RATIO * pbytes + MEMORY_PER_LAYER * len(probe.layers),
            "peak_mem_bytes": (variant.transient_peak + resident_bytes(params, optimizer, extra)
                               if device.type == "cuda" else None),
        }
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- output
COLUMNS = [("model", "model", "{:<10}"), ("controller", "controller", "{:<16}"),
           ("step_ms_median", "median ms", "{:>10.1f}"), ("step_ms_p10", "p10 ms", "{:>9.1f}"),
           ("step_ms_p90", "p90 ms", "{:>9.1f}"), ("images_per_s", "img/s", "{:>8.0f}"),
           ("ratio_to_bare", "ratio", "{:>6.3f}"), ("ratio_paired", "paired", "{:>6.3f}"),
           ("target", "target", "{:>6.2f}"), ("extra_kernel_ops", "+ops", "{:>5d}"),
           ("extra_state_ratio", "extra/P", "{:>7.3f}")]


def format_table(rows: list[dict]) -> str:
    widths = [len(fmt.format(0 if "s}" not in fmt and "<" not in fmt else "")) for _, _, fmt in COLUMNS]
    lines = ["  ".join(title.ljust(w) if "<" in fmt else title.rjust(w)
                       for (_, title, fmt), w in zip(COLUMNS, widths)) + "  ok"]
    for row in rows:
        cells = [("-".rjust(w) if row[key] is None else fmt.format(row[key]))
                 for (key, _, fmt), w in zip(COLUMNS, widths)]
        ok = {None: "", "met": "yes", "within noise": "noise", "missed": "NO"}[row["verdict"]]
        ok = ok if row["meets_memory"] else "NO (memory)"
        lines.append("  ".join(cells) + f"  {ok}")
    return "\n".join(lines)


def misses(rows: list[dict]) -> list[str]:
    out = []
    for row in rows:
        if row["meets_target"] is False:
            ci = row["ratio_paired_ci95"]
            noise = "no CI (too few rounds)" if ci is None else (
                f"95% CI of the paired ratio {ci[0]:.3f}-{ci[1]:.3f}: "
                + ("includes the target, within noise" if row["verdict"] == "within noise" else "above the target"))
            out.append(f"{row['model']}/{row['controller']}: ratio {row['ratio_to_bare']:.3f} > target "
                       f"{row['target']:.2f} (over by {(row['ratio_to_bare'] / row['target'] - 1) * 100:.1f}%; {noise})")
        if row.get("meets_ops") is False:
            out.append(f"{row['model']}/{row['controller']}: {row['extra_kernel_ops']} extra kernel ops per step > "
                       f"target {row['ops_target']}")
        if not row["meets_memory"]:
            out.append(f"{row['model']}/{row['controller']}: extra state {row['extra_state_ratio']:.3f}x the "
                       f"parameter bytes > {MEMORY_RATIO:.0f}x "
                       f"(over by {row['extra_state_bytes'] - MEMORY_RATIO * row['param_bytes']:,.0f} bytes)")
    return out


# ----------------------------------------------------------------------------- replicas
def measure_replicas(model_name: str, controllers: list[str], args, workdir: Path) -> list[dict]:
    """Per controller: S replicas stepped together (:mod:`meta_llr.replicas`) against one run
    stepped S times (S sequential runs), the same batches, interleaved blocks as above. Images/s
    across the replicas vs the sequential runs (``speedup``, issue 16's target: >= 4 at S = 16
    on a GPU) and the kernel ops of one step of each."""
    from meta_llr.data import Split, load_data
    from meta_llr.replicas import build_replicas
    from meta_llr.run import build_run

    S, device = args.replicas, torch.device(args.device)
    base = [*data_overrides(args.data, args.synthetic_size), *model_overrides(model_name), f"device={args.device}",
            "quiet=true", f"trainer.batch_size={args.batch}", "trainer.checkpoint=false", "logger=[csv]"]
    first = compose_config([*base, "controller=uniform"])
    data = load_data(first.data)
    for split in ("train", "test", "val"):
        if getattr(data, split) is not None:
            setattr(data, split, Split(getattr(data, split).x.to(device), getattr(data, split).y.to(device)))
    steps_per_epoch = math.ceil(len(data.train) / args.batch)
    base.append(f"trainer.epochs={math.ceil((args.warmup + 2 * args.steps + 4) * args.replicas / steps_per_epoch) + 1}")
    rows = []
    for name in controllers:
        cfg = compose_config([*base, f"controller={name}"])
        group = build_replicas(compose_config([*base, f"controller={name}", f"replicas={S}"]),
                               [workdir / f"{name}-r{i}" for i in range(S)], data=data)
        single = build_run(cfg, workdir / f"{name}-single", data=data)
        def forever(run):  # batches() ends with its epoch
            while True:
                yield from run.batches()

        draws = [forever(run) for run in group.runs]
        one = forever(single)

        def group_step():
            group.train_step({i: next(d) for i, d in enumerate(draws)})

        def single_steps():
            for _ in range(S):
                single.train_step(*next(one))

        def timed(step) -> float:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return (time.perf_counter() - started) * 1e3

        for _ in range(args.warmup + 1):
            group_step()
            single_steps()
        group_ms, single_ms = [], []
        for _ in range(args.steps):
            group_ms.append(timed(group_step))
            single_ms.append(timed(single_steps))
        batches = {i: next(d) for i, d in enumerate(draws)}  # drawn outside the count, as for bare
        counter = _OpCounter()
        with counter:
            group.train_step(batches)
        group_ops = counter.kernels
        batch = next(one)
        counter = _OpCounter()
        with counter:
            single.train_step(*batch)
        g, q = float(np.median(group_ms)), float(np.median(single_ms))
        rows.append({"model": model_name, "controller": name, "device": device.type, "replicas": S,
                     "batch": args.batch, "steps_timed": args.steps,
                     "replicas_step_ms": round(g, 3), "sequential_steps_ms": round(q, 3),
                     "images_per_s_replicas": round(S * args.batch / (g / 1e3), 1),
                     "images_per_s_sequential": round(S * args.batch / (q / 1e3), 1),
                     "speedup": round(q / g, 3), "kernel_ops_replicas": group_ops,
                     "kernel_ops_single_run": counter.kernels})
        print(f"{model_name:<10} {name:<16} S={S}: {g:9.1f} ms together vs {q:9.1f} ms for {S} sequential steps: "
              f"{q / g:5.2f}x; kernel ops {group_ops} vs {counter.kernels} per run-step", flush=True)
        del group, single
        gc.collect()
    return rows


# ----------------------------------------------------------------------------- sync check
def sync_check(model_name: str, controllers: list[str], args, registry, workdir: Path) -> list[str]:
    """``SYNC_CHECK_STEPS`` steps per controller with CUDA sync debug mode "error"; the failures."""
    if args.device != "cuda":
        raise UserError("--sync-check needs --device cuda (on CPU, tests/test_contract.py counts host syncs)")
    # Short synthetic epochs, so that the 50 steps include end-of-epoch (diagnostics) steps.
    args = argparse.Namespace(**{**vars(args), "warmup": 0, "steps": 0, "plan_epochs": 1,
                                 "synthetic_size": min(args.synthetic_size, 20 * args.batch)})
    variants, batches, _ = build_variants(model_name, controllers, args, registry, workdir)
    failures = []
    for variant in variants[1:]:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for i in range(SYNC_CHECK_STEPS):
                variant.step(*batches[i % len(batches)])
            status = "ok"
        except Exception as error:  # a sync raises RuntimeError; report any failure, go on
            status = f"FAILED at step {variant.run.step}: {type(error).__name__}: {(str(error) or '?').splitlines()[0]}"
            failures.append(f"{model_name}/{variant.name}: {status}")
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
        print(f"[sync-check {model_name}] {variant.name:<18} {SYNC_CHECK_STEPS} steps: {status}", flush=True)
    return failures


# ----------------------------------------------------------------------------- main
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m meta_llr.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--models", default="fastnet,resnet", help="comma-separated: fastnet, resnet, resnetN, ...")
    parser.add_argument("--controllers", default="all", help="comma-separated registered names, or 'all'")
    parser.add_argument("--steps", type=int, help="timed steps per variant (cpu 8, cuda 100)")
    parser.add_argument("--warmup", type=int, help="discarded steps per variant (cpu 1, cuda 10)")
    parser.add_argument("--block", type=int, help="steps per variant per round (cpu 1, cuda 10)")
    parser.add_argument("--batch", type=int, help="batch size (cpu 256, cuda 512)")
    parser.add_argument("--data", default="synthetic", help="'synthetic' (CIFAR-shaped) or an image-folder PATH")
    parser.add_argument("--synthetic-size", type=int, default=SYNTHETIC_TRAIN_SIZE,
                        help="training images of the synthetic data (sets how often the once-per-epoch "
                             "diagnostics step comes)")
    parser.add_argument("--out", default=".", help="folder for bench.json")
    parser.add_argument("--plan-epochs", type=int, default=PLAN_EPOCHS,
                        help="epochs of the runs' plan: sizes per-step tables (controllers that precompute "
                             "a [steps, layers] curve) as in a real run; the bench takes only a few steps of it")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--clock", default="wall", choices=sorted(CLOCKS),
                        help="CPU only: 'thread' times the CPU time of the main thread (use with --threads 1): "
                             "insensitive to other processes on a shared machine, not a wall-clock speed")
    parser.add_argument("--replicas", type=int, default=0,
                        help="S > 1: instead of the ratio table, S replicas in one process against S sequential "
                             "runs (images/s, kernel ops) for --controllers (default uniform)")
    parser.add_argument("--ops-steps", type=int, default=OPS_STEPS,
                        help="after the counted step, the mean kernel ops over this many more ordinary steps "
                             "(extra_kernel_ops_mean: a controller's work every k steps, spread)")
    parser.add_argument("--sync-check", action="store_true",
                        help=f"instead of timing: {SYNC_CHECK_STEPS} steps per controller under "
                             "torch.cuda.set_sync_debug_mode('error')")
    args = parser.parse_args(argv)
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.replicas == 1 or args.replicas < 0:
        raise UserError(f"--replicas must be >= 2 (or 0: off), got {args.replicas}")
    for key in ("steps", "batch", "block", "synthetic_size", "plan_epochs", "ops_steps"):
        if getattr(args, key) < 1:
            raise UserError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {args.warmup}")
    if args.clock == "thread" and args.device != "cpu":
        raise UserError("--clock thread is for --device cpu only (CUDA steps are timed with CUDA events)")
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA GPU is visible; use --device cpu")
    return args


def main(argv=None) -> int:
    os.environ.setdefault("WANDB_MODE", "disabled")
    from meta_llr.registry import available

    args = parse_args(sys.argv[1:] if argv is None else argv)
    registry = available()
    if args.controllers == "all":
        controllers = ["uniform"] if args.replicas else list(registry)
    else:
        controllers = [c.strip() for c in args.controllers.split(",") if c.strip()]
        unknown = [c for c in controllers if c not in registry]
        if unknown:
            raise UserError(f"unknown controller {', '.join(unknown)}; registered: {', '.join(registry)}")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        model_overrides(m)
    data_overrides(args.data)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    print(f"bench: torch {torch.__version__}, {args.device} ({device_name}), {torch.get_num_threads()} threads, "
          f"{args.clock} clock, "
          f"batch {args.batch}, {args.steps} timed + {args.warmup} warm-up steps per variant in blocks of "
          f"{args.block}; controllers: {', '.join(controllers)}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="meta_llr_bench_") as tmp:
        if args.sync_check:
            failures = []
            for m in models:
                failures += sync_check(m, controllers, args, registry, Path(tmp) / m)
            print("sync-check: " + ("all passed" if not failures else "FAILED\n  " + "\n  ".join(failures)))
            return 1 if failures else 0
        if args.replicas:
            rows = [row for m in models for row in measure_replicas(m, controllers, args, Path(tmp) / m)]
            (out / "bench_replicas.json").write_text(json.dumps(rows, indent=1) + "\n")
            print(f"wrote {out / 'bench_replicas.json'}")
            return 0
        rows = []
        for m in models:
            rows += measure(m, controllers, args, registry, Path(tmp) / m)
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 reports
        return 0
    (out / "bench.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(format_table(rows))
    missed = misses(rows)
    print(f"targets missed ({len(missed)}):\n  " + "\n  ".join(missed) if missed else "all targets met")
    print(f"wrote {out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
