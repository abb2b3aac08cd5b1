"""Many seeds in one process: ``replicas=S`` trains S independent runs of one configuration,
seeds ``seed`` … ``seed+S−1``, at the launch cost of about one.

Each replica is an ordinary :class:`meta_llr.run.Run` (its own model initialised from its
seed, data order and augmentation stream, controller, optimizer state, trace, records and run
directory ``<dir>/s<seed>``, written as a single run writes it, so ``compare`` and ``study``
read replicas unchanged). What they share is storage and the heavy ops of a step:

* parameter k of replica i is row i of one ``[S, *shape]`` leaf, inside the ``[S, N]`` flat
  buffer of a :class:`meta_llr.optim.FlatStep` over all replicas; buffers (BatchNorm
  statistics) are rows of ``[S, *shape]`` tensors. Each replica's own module sees views of its
  rows, so its evaluation, checkpoints and statistics are its own;
* the forward and backward are batched across replicas with ``torch.func.vmap`` over
  ``torch.func.functional_call`` (grouped convolutions, batched matmuls): per-replica losses
  ``[S]`` whose sum is differentiated once, each replica's gradient landing in its row;
* the optimizer update is one :class:`~meta_llr.optim.FlatStep` over ``[S, N]`` and the trace
  rows of all replicas one copy.

Per replica remain: the batch draw (its generator), the statistics and ``scales`` of its
controller (nothing for ``uniform`` and the closed-form baselines, whose scales are stacked
into ``[S, L]`` by one op), ``observe``, and the evaluations (its own module, per epoch).

Guarantee: replica i follows the run ``seed=seed+i`` up to float rounding (batched kernels sum
in another order; tests/test_replicas.py: weights after 5 steps within 1e-5 of each tensor's
largest magnitude, and the scales within 1e-5, for uniform, depth_linear, adam_probe and
hessian_secant with a curvature probe every 2 steps). The replicas share the trainable mask (a
controller that freezes layers by step does; one that froze different layers per replica is
refused) and, being stacked, the model's memory format (contiguous, no channels_last).
Each replica's ``wall_s`` is the group's wall time (they train together). Not with ``torchrun``
or ``trainer.compile``. A replica that diverges stops its records; its rows are still computed
(harmlessly, on an active replica's batch) until every replica is done, and a resumed group
leaves a replica that is already over as it is. An error in one replica's step or records is
recorded in every replica still training (``failed``), none is left saying ``running``.
"""
from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.func import functional_call, vmap

from meta_llr.data import load_data
from meta_llr.errors import Interrupted, UserError
from meta_llr.optim import FlatStep
from meta_llr.run import SIGNALS, Run, _chainable, build_run, resume_if_asked


class _Rows:
    """Hands out the rows of one ``[S, N]`` buffer, allocated at the first request."""

    def __init__(self, count: int):
        self.count, self.buffer, self.given = count, None, 0

    def __call__(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if self.buffer is None:
            self.buffer = torch.empty(self.count, numel, dtype=dtype, device=device)
        if self.buffer.shape[1] != numel or self.given >= self.count:
            raise ValueError("replicas must have the same parameters")
        self.given += 1
        return self.buffer[self.given - 1]


def replica_configs(cfg: DictConfig) -> list[DictConfig]:
    """The S replicas' configs: ``cfg`` with ``seed`` + i (``replicas`` kept: it is how they ran)."""
    configs = []
    for i in range(int(cfg.replicas)):
        one = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
        one.seed = int(cfg.seed) + i
        configs.append(one)
    return configs


class Replicas:
    """S runs stepped together. Build with :func:`build_replicas`; ``fit()`` trains them all."""

    def __init__(self, runs: list[Run], rows: _Rows):
        self.runs, self.S = runs, len(runs)
        first = runs[0]
        if first.dist.active or first.cfg.trainer.compile:
            raise UserError("replicas>1 runs in one process without torchrun and without trainer.compile; "
                            "use replicas=1 there")
        device = first.device
        # Parameters: the layers' parameters are rows of the [S, N] buffer already (the runs were
        # built into it); the stacked leaves are views of it, one per parameter position.
        flat = rows.buffer
        names = [dict(run.model.named_parameters()) for run in runs]
        self.flat_step = FlatStep([run.optimizer for run in runs], len(first.layers), flat,
                                  stacked=self._leaves(first, flat))
        order = self.flat_step.params
        name_of = {id(p): n for n, p in names[0].items()}
        self.stacked = dict(zip((name_of[id(p)] for p in order), self.flat_step.stacked))
        with torch.no_grad():
            for name in names[0]:  # parameters outside the layers (e.g. a fixed first layer)
                if name not in self.stacked:
                    self.stacked[name] = self._stack([n[name] for n in names])
            self.buffers = {}
            buffers = [dict(run.model.named_buffers()) for run in runs]
            for name in buffers[0]:
                self.buffers[name] = self._stack([b[name] for b in buffers])
        for i, run in enumerate(runs):
            run.flat_step = self.flat_step
            run.own_signals = False
        # One trace for all: run i's trace is column i of [rows, S, L], filled by one copy a step.
        self.trace = torch.stack([run.trace for run in runs], dim=1)
        for i, run in enumerate(runs):
            run.trace = self.trace[:, i]
            run.trace_by_replicas = True
        self.template = first.model
        self.stop_signal: int | None = None
        self.device = device

    @staticmethod
    def _leaves(first: Run, flat: torch.Tensor) -> list[torch.Tensor]:
        """``[S, *shape]`` leaves, views of the flat buffer, in the flat step's order."""
        order = FlatStep._order(first.optimizer)
        leaves, offset = [], 0
        for p, _ in order:
            n = p.numel()
            leaves.append(flat[:, offset:offset + n].view(flat.shape[0], *p.shape).detach().requires_grad_(p.requires_grad))
            offset += n
        return leaves

    @staticmethod
    def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
        """Stack same-shaped tensors into new storage; make each a view of its row."""
        stacked = torch.stack([t.detach() for t in tensors])
        for row, t in zip(stacked, tensors):
            t.data = row
        return stacked.requires_grad_(False)

    # ------------------------------------------------------------------ one batched step
    def train_step(self, batches: dict[int, tuple]) -> None:
        """One step of the replicas in ``batches`` (index -> ``(x, y)``); the others' rows take
        the first active replica's batch (same shape, even at an epoch's short last batch)."""
        runs, S = self.runs, self.S
        active = sorted(batches)
        for i in active:
            runs[i].begin_step()
        masks = {tuple(runs[i].trainable) for i in active}
        if len(masks) > 1:
            raise UserError("the replicas' controllers froze different layers at one step; replicas share the "
                            "trainable mask: run these seeds with replicas=1")
        lead = runs[active[0]]
        for leaf, p in zip(self.flat_step.stacked, self.flat_step.rows[active[0]]):
            leaf.requires_grad_(p.requires_grad)
        rows = [batches.get(i, batches[active[0]]) for i in range(S)]
        xs = torch.stack([x for x, _ in rows])
        ys = torch.stack([y for _, y in rows])
        template, loss_fn, normalize = self.template, lead._loss_fn, lead.normalize

        def one(params, buffers, x, y):
            out = functional_call(template, (params, buffers), (normalize(x),))
            return loss_fn(out, y), out

        with lead.autocast():
            loss, out = vmap(one, randomness="different")(self.stacked, self.buffers, xs, ys)
        if any(lead.trainable):
            loss.sum().backward()
        scales = []
        for i in range(S):
            run = runs[i]
            if i not in batches:   # a replica that is over: its row is stepped, nothing recorded
                scales.append(run.trace[max(run.step - 1, 0) // run.trace_every])
                continue
            for p, leaf in zip(run.flat_step.rows[i], self.flat_step.stacked):
                p.grad = leaf.grad[i] if leaf.grad is not None else None
            scales.append(run.decide(xs[i], ys[i], loss[i], out[i]))
        scales = torch.stack(scales)
        step = lead.step
        with torch.no_grad():
            if step % lead.trace_every == 0:
                self.trace[step // lead.trace_every].copy_(scales)
            for i in active:
                runs[i].before_update(scales[i])
            self.flat_step.step(scales, lead.lr_floats[step])
            for i in active:
                runs[i].after_update(scales[i])
        for leaf in self.flat_step.stacked:
            leaf.grad = None

    # ------------------------------------------------------------------ the runs together
    def fit(self, over: list[dict | None] | None = None) -> list[dict]:
        """Train every replica to its end; their summaries, in seed order. ``over``: the
        summaries of replicas already over (finished or diverged, from a resume), left as they
        are; None for the ones to train."""
        runs = self.runs
        results = list(over) if over is not None else [None] * self.S
        todo = [i for i in range(self.S) if results[i] is None]
        steps = {runs[i].step for i in todo}
        if len(steps) > 1:  # before any loop starts: no record is touched
            raise UserError(f"the replicas' checkpoints are at different steps ({sorted(steps)}), so they cannot "
                            f"continue as one group; train them again in a new directory")
        loops = {i: runs[i].loop() for i in todo}
        batches: dict[int, tuple] = {}
        handlers = self._catch_signals()
        try:
            try:
                for i, loop in loops.items():
                    try:
                        batches[i] = next(loop)
                    except StopIteration as done:
                        results[i] = done.value
                while batches:
                    self.train_step(batches)
                    for i in list(batches):
                        if self.stop_signal is not None:
                            runs[i].stop_signal = self.stop_signal
                        try:
                            batches[i] = loops[i].send(None)
                        except StopIteration as done:
                            results[i] = done.value
                            del batches[i]
            except BaseException as error:  # every loop still open records it (its summary says failed)
                for i in list(batches):
                    try:
                        loops[i].throw(error)
                    except BaseException:
                        pass
                raise
        finally:
            for number, handler in handlers.items():
                signal.signal(number, handler)
        if self.stop_signal is not None:
            print(f"interrupted by {signal.Signals(self.stop_signal).name}; resume with trainer.resume=auto and the "
                  f"same directory ({runs[0].records.dir.parent})", file=sys.stderr)
            previous = handlers.get(self.stop_signal)
            if _chainable(previous):
                previous(self.stop_signal, None)
            raise Interrupted(self.stop_signal)
        return results

    def _catch_signals(self) -> dict:
        def on_signal(number, frame):
            if self.stop_signal is not None:
                raise KeyboardInterrupt
            self.stop_signal = number
            for run in self.runs:
                run.stop_signal = number

        if threading.current_thread() is not threading.main_thread():
            return {}
        numbers = list(SIGNALS)
        if _chainable(signal.getsignal(signal.SIGUSR2)):
            numbers.append(signal.SIGUSR2)
        return {number: signal.signal(number, on_signal) for number in numbers}


def build_replicas(cfg: DictConfig, out_dirs: list[str | Path], data=None) -> Replicas:
    """The replicas of ``cfg`` (``cfg.replicas`` of them) in ``out_dirs``, data loaded once."""
    configs = replica_configs(cfg)
    if len(out_dirs) != len(configs):
        raise ValueError(f"{len(configs)} replicas need {len(configs)} directories")
    data = data if data is not None else load_data(cfg.data)
    rows = _Rows(len(configs))
    runs = [build_run(one, out, data=data, storage=rows) for one, out in zip(configs, out_dirs)]
    return Replicas(runs, rows)


def replica_dirs(cfg: DictConfig, out_dir: str | Path) -> list[Path]:
    """``out_dir/s<seed>`` for each replica."""
    return [Path(out_dir) / f"s{int(cfg.seed) + i}" for i in range(int(cfg.replicas))]


def train_replicas(cfg: DictConfig, out_dir: str | Path) -> list[dict]:
    """Train (or continue, see :func:`meta_llr.run.resume_if_asked`) the replicas in
    ``out_dir/s<seed>``; their summaries."""
    group = build_replicas(cfg, replica_dirs(cfg, out_dir))
    over = [resume_if_asked(run) for run in group.runs]
    if all(summary is not None for summary in over):
        return over
    return group.fit(over)
