"""One training run, composable: ``build_run(cfg, out_dir, model=..., data=..., controller=...)``
assembles the parts (any may be passed in, the rest come from the config) and ``Run.fit()``
trains. ``python -m meta_llr.train`` (:mod:`meta_llr.train`), the Python API
(:func:`meta_llr.fit`), the bench and meta-training all run through here.

Read top to bottom: data on the device, model and its layers, the global LR
table, the controller, the optimizer (torch's SGD or AdamW holding the state, one param group
per layer; the step is :class:`meta_llr.optim.FlatStep`, a fixed number of element-wise ops
over all parameters in one flat buffer), then the step:

    controller.trainable(step)                          # freezing, before the forward
    loss = cross_entropy(model(augment(x)), y); loss.backward()
    (statistics the controller needs, batched)          # torch._foreach_norm & co
    scales = controller.scales(step)                    # [L] on the device; may read p.grad
    flat_step.step(scales, global_lr[step])             # LR of layer l: global_lr * scales[l]
    controller.observe(step, stats)

Metrics reach the host once per log interval and per evaluation, never inside a step.
All run state is in ``Run.state_dict()``; a checkpoint (:mod:`meta_llr.checkpoint`) is written
after every epoch, and at the next step boundary after SIGTERM, SIGINT or SIGUSR1, which then
end the run as ``interrupted`` (exit status 128 + signal from the command). A resumed run
(:func:`resume_if_asked`) continues bit for bit, and only as the run its config says.
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from torch import nn

from meta_llr import checkpoint
from meta_llr.data import Dataset, augment, load_data
from meta_llr.diagnostics import LAYER_STATS, Diagnostics
from meta_llr.distributed import SINGLE, Distributed, setup
from meta_llr.errors import Interrupted, UserError
from meta_llr.interface import STATS, Controller, Lookahead, OptimizerSpec, Plan
from meta_llr.layers import group_layers, layer_table, norm_parameters, trace_layers
from meta_llr.loggers import Logger, make_logger
from meta_llr.models import build_model
from meta_llr.optim import FlatStep, flatten_, layer_optimizer, parameter_order, zeros_laid_out_like
from meta_llr.per_layer import PerLayer
from meta_llr.registry import build_controller
from meta_llr.schedules import lr_factors
from meta_llr.weight_average import WeightAverage
from meta_llr.records import CONFIG, ENV, LAYERS, METRICS, SUMMARY, RunRecords, environment, rows_csv

# Checkpoint at the next step boundary, record ``interrupted``, exit 128+N. SIGUSR2 too when a
# handler is installed for it before the run (submitit's), which is then called after the checkpoint.
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


PENDING_STEPS = 32  # steps whose loss and logits wait for the next log point, at most

class Run:
    """One training run; everything it needs to continue is in ``state_dict()``."""

    def __init__(self, cfg: DictConfig, out_dir: str | Path, *, data: Dataset, model: nn.Module,
                 controller: Controller, device: torch.device, dist: Distributed = SINGLE, storage=None):
        """Use :func:`build_run`; this takes the parts already built (``cfg`` checked). Under
        ``torchrun``, ``dist`` is this rank (:mod:`meta_llr.distributed`). ``storage`` supplies
        the flat parameter buffer (a row of the replicas' one, :mod:`meta_llr.replicas`)."""
        self.cfg = cfg
        t = cfg.trainer
        self.device = device
        self.dist = dist
        self.quiet = bool(cfg.quiet) or not dist.main

        # Data: the whole dataset lives on the device as uint8.
        self.data_name, self.synthetic, self.data_source = data.name, data.synthetic, data.source
        self.chance_acc = chance_accuracy(data.test.y)
        # the cross-entropy of a uniform guess: the divergence reference when the first log
        # interval is above it (a blow-up inside the first interval must not raise its own bar)
        self.chance_loss = torch.tensor(math.log(max(data.num_classes, 2)), device=device)
        self.train_x, self.train_y = data.train.x.to(device), data.train.y.to(device)
        self.eval_splits = {"test": data.test}
        if data.val is not None:
            self.eval_splits["val"] = data.val
        self.eval_splits = {k: (s.x.to(device), s.y.to(device)) for k, s in self.eval_splits.items()}
        self.mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(data.std, device=device).clamp_min(1e-3).view(1, -1, 1, 1) * 255  # constant channels
        self.crop_pad, self.flip = int(cfg.data.augment.crop_pad), bool(cfg.data.augment.flip)
        self.reflect = cfg.data.augment.pad_mode == "reflect"
        if self.reflect and self.crop_pad >= min(self.train_x.shape[-2:]):
            raise UserError(f"data.augment.crop_pad={self.crop_pad} with pad_mode=reflect needs a pad smaller than "
                            f"the {tuple(self.train_x.shape[-2:])} images; lower crop_pad or use pad_mode=zeros")
        self.flip_coins = None  # alternate_flip: each image's mirroring in even epochs, drawn once from the seed
        if self.flip and cfg.data.augment.alternate_flip:
            coins = torch.Generator(device=device)
            coins.manual_seed(int(cfg.seed) + 2)  # its own stream: the crops' draws are unchanged
            self.flip_coins = torch.rand(len(self.train_y), generator=coins, device=device) < 0.5

        # Model, and its layers in forward order.
        self.model = model.to(device)
        self.channels_last = device.type == "cuda" and self.train_x.dim() == 4 and storage is None
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        init_from_data = getattr(self.model, "init_from_data", None)
        if init_from_data is not None:  # a data-dependent initialisation (fastnet's whitening)
            # evenly spaced images, not the first ones: an image tree's training set is sorted by class
            n, k = len(self.train_x), min(len(self.train_x), getattr(self.model, "whiten_images", 5000))
            init_from_data(self.normalize(self.train_x[torch.arange(k, device=device) * n // k]))
        traced = trace_layers(self.model, self.normalize(self.train_x[:2]))
        self.layers, group_of = group_layers(traced, cfg.layers.groups)
        # The parameters live in one flat buffer (the optimizer step's), from here on: before a
        # controller or a statistic keeps views of them.
        self.flat_params = flatten_(parameter_order(self.layers), into=storage)
        self.shares_storage = storage is not None
        self.layer_rows = layer_table(traced, group_of)
        self.forward = torch.compile(self.model) if t.compile else self.model
        use_bf16 = t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda")
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
        self.precision = "bf16" if use_bf16 else "fp32"  # what trainer.precision resolved to here

        # The plan and the global LR table.
        self.batch_size = int(t.batch_size)
        self.epochs = int(t.epochs)
        self.steps_per_epoch = math.ceil(len(self.train_y) / self.batch_size)
        total = self.steps_per_epoch * self.epochs
        lr_table = torch.tensor(t.lr * lr_factors(cfg.schedule, total), dtype=torch.float32, device=device)
        self.plan = Plan(total_steps=total, steps_per_epoch=self.steps_per_epoch, epochs=self.epochs,
                         device=device, lr_table=lr_table,
                         optimizer=OptimizerSpec(name=t.optimizer, momentum=float(t.momentum),
                                                 nesterov=bool(t.nesterov and t.momentum > 0),
                                                 betas=tuple(float(b) for b in t.betas),
                                                 weight_decay=float(t.weight_decay), decay_1d=bool(t.decay_1d),
                                                 norm_lr_mult=float(t.norm_lr_mult)),
                         lookahead=Lookahead(self.model, self._loss_fn, self._sample_batches,
                                             held_out="val" in self.eval_splits),
                         **({"reduce": dist.mean_} if dist.active else {}))
        self.lookahead_gen = torch.Generator(device=device)
        self.lookahead_gen.manual_seed(int(cfg.seed) + 1)  # its own stream: the training order is unchanged
        self.lr_host = lr_table.cpu()
        self.lr_floats = self.lr_host.tolist()  # the optimizer's global LR, known on the host: no sync

        # The controller.
        self.controller = controller
        controller.setup(self.layers, self.plan)
        self.needs = frozenset(controller.needs)
        if not self.needs <= STATS:
            raise ValueError(f"controller {cfg.controller.name} needs unknown stats {sorted(self.needs - STATS)}")
        hooks = controller.hooks()
        self.observes = "observe" in hooks
        self.controls_trainable = "trainable" in hooks
        self.transforms = "transform_update" in hooks
        # Optimizer: torch's, one group per layer (split by kind when 1-D tensors get another
        # decay or LR), holding the state; the step is FlatStep's (the parameters move into its
        # flat buffer here, before DDP sees them).
        num_layers = len(self.layers)
        self.scale_1d = bool(self.controller.scale_1d)
        self.optimizer = layer_optimizer(self.layers, t, self.scale_1d, norm_parameters(self.model))
        self.flat_step = FlatStep(self.optimizer, num_layers, self.flat_params)
        self.weight_average = (WeightAverage(self.flat_params, list(self.model.buffers()), t.ema_every, t.ema_decay,
                                             total, t.ema_start * self.steps_per_epoch, self.steps_per_epoch)
                               if t.ema_every else None)
        self.plan.lookahead.optimizer = self.optimizer

        if dist.active:  # gradients averaged across ranks; frozen layers leave parameters unused
            from torch.nn.parallel import DistributedDataParallel

            ddp = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None,
                                          find_unused_parameters=self.controls_trainable
                                          or hasattr(self.model, "epoch_start"))
            self.forward = torch.compile(ddp) if t.compile else ddp


        # Per-step statistics machinery: a flat list of params with their layer index, and one
        # buffer holding the weights before the step (later the negated update) when needed.
        self.per_layer = PerLayer.of_layers(self.layers, device)
        self.params = self.per_layer.tensors
        name_of = {id(p): n for n, p in self.model.named_parameters()}
        self.param_names = [name_of[id(p)] for p in self.params]  # for functional calls (loss_at)
        needs_buffer = self.transforms or bool(self.needs & {"update_norm", "grad_dot_prev_update"})
        self.prev = zeros_laid_out_like(self.params, self.flat_params) if needs_buffer else None
        self.prev_by_layer = self._by_layer(self.prev) if self.prev is not None else None
        self.zero = torch.zeros((), device=device)
        self.trainable = [True] * num_layers
        self.diagnostics = Diagnostics(cfg.diagnostics, self.layers, device)
        self.diagnostics.set_probe_batch(self.model, self.normalize(self.train_x[:self.batch_size]),
                                         self.train_y[:self.batch_size], self._loss_fn, self.param_names)

        # Run position, accumulators, records.
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(int(cfg.seed))
        self.step = self.epoch = self.position = 0
        self.order: torch.Tensor | None = None
        self.loss_sum = torch.zeros((), device=device)
        self.pending: list[tuple] = []  # (loss, logits, labels) of steps not yet in loss_sum / correct
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.seen = 0
        self.best = {}
        self.wall_before = 0.0
        self.status, self.error, self.reason = "running", None, None
        self.stop_signal: int | None = None  # set by a signal handler
        self.own_signals = True  # False when replicas handle the signals for their runs
        self.stopping = False  # the decision to stop, taken at step boundaries (all ranks agree)
        self.global_batch = self.batch_size  # images in this step's batch across ranks (set by batches())
        self.resumes: list[dict] = []  # where this run was resumed from, for the summary
        self.trace_every = int(cfg.trainer.trace_every or max(1, total // 200))
        self.trace = torch.zeros(math.ceil(total / self.trace_every), num_layers, device=device)
        self.trace_flushed = 0
        self.trace_by_replicas = False  # replicas copy all their trace rows at once
        self.log_every = int(t.log_every)
        # Training loss per log interval (train_loss.csv): row k is the mean loss of the steps up
        # to min((k+1) * log_every, total), kept on the device and flushed at evaluations. The
        # interval's sum is loss_sum - loss_base (loss_base follows loss_sum's resets).
        self.divergence_factor = float(t.divergence_factor)
        self.loss_log = torch.full((math.ceil(total / self.log_every),), math.nan, device=device)
        self.loss_base = torch.zeros((), device=device)
        self.seen_base = 0
        self.loss_logged = self.loss_flushed = 0
        self.eval_every_steps = int(t.eval_every_steps or 0)
        self.label_smoothing = float(t.label_smoothing)
        self.eval_every = int(t.eval_every)
        self.eval_batch = int(t.eval_batch_size)
        self.tta = int(t.tta)
        self.records = RunRecords(out_dir, write=dist.main)
        self.logger = make_logger(cfg, self.records.dir) if dist.main else Logger()

    # ------------------------------------------------------------------ building blocks
    def _by_layer(self, flat: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        out, i = [], 0
        for layer in self.layers:
            out.append(flat[i:i + len(layer.params)])
            i += len(layer.params)
        return out

    def _loss_fn(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.float(), y, label_smoothing=self.label_smoothing)

    def _sample_batches(self, k: int):
        """``Plan.sample_batches``: k random augmented training batches and one validation batch."""
        if "val" not in self.eval_splits:
            raise UserError("this controller needs a held-out batch: set data.val_size=N (e.g. 5000 for CIFAR)")
        gen, size = self.lookahead_gen, self.batch_size
        batches = []
        for _ in range(k):
            index = torch.randint(len(self.train_y), (size,), generator=gen, device=self.device)
            batches.append((self.normalize(self.augment(index, gen)), self.train_y[index]))
        val_x, val_y = self.eval_splits["val"]
        index = torch.randint(len(val_y), (size,), generator=gen, device=self.device)
        return batches, (self.normalize(val_x[index]), val_y[index])

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def set_trainable(self, mask: list[bool]) -> None:
        """Freeze or unfreeze layers: a frozen layer computes no gradient and is not stepped."""
        for layer, train in zip(self.layers, mask):
            for p in layer.params:
                p.requires_grad_(train)
                if not train:
                    p.grad = None
        self.trainable = list(mask)

    def _loss_at(self, x: torch.Tensor, y: torch.Tensor):
        """The ``loss_at`` statistic: this batch's loss as a function of the layer parameters."""
        def loss_at(params):
            buffers = {n: b.clone() for n, b in self.model.named_buffers()}  # BN stats untouched
            with self.autocast():
                out = torch.func.functional_call(self.model, (dict(zip(self.param_names, params)), buffers),
                                                 (self.normalize(x),))
                return self._loss_fn(out, y)
        return loss_at

    # ------------------------------------------------------------------ one step
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One step: the phases below, in order (:mod:`meta_llr.replicas` runs the same phases
        for several runs around one batched forward, backward and optimizer step)."""
        self.begin_step()
        with self.autocast():
            out = self.forward(self.normalize(x))
            loss = self._loss_fn(out, y)
        if any(self.trainable):
            loss.backward()
        scales = self.decide(x, y, loss, out)
        with torch.no_grad():  # the update: outside autograd
            self.before_update(scales)
            self.flat_step.step(scales, self.lr_floats[self.step])
            self.after_update(scales)

    def begin_step(self) -> None:
        """Before the forward: the controller's trainable mask for this step."""
        if self.controls_trainable:
            mask = self.controller.trainable(self.step)
            if mask is not None and list(mask) != self.trainable:
                self.set_trainable(mask)

    def decide(self, x: torch.Tensor, y: torch.Tensor, loss: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """After ``backward()``: this step's statistics and the controller's scales."""
        step, controller, needs = self.step, self.controller, self.needs
        totals = None
        if self.dist.active:  # the global batch's loss and count on every rank, on the device
            totals = torch.stack([loss.detach() * len(y), (out.argmax(1) == y).sum().float(),
                                  loss.new_full((), float(len(y)))])  # a fill kernel, no host copy
            loss_sum, correct, count = self.dist.sum_(totals).unbind()
            totals = (loss_sum, correct)
            loss = loss_sum / count

        global_lr = self.plan.lr_table[step]
        probe = (step + 1) % self.steps_per_epoch == 0  # last step of an epoch: diagnostics too
        if probe:
            needs = needs | self.diagnostics.needs
        # This step's statistics that exist before the update: computed once, batched, shared
        # by scales (controller.stats) and observe.
        stats = {"loss": loss.detach(), "global_lr": global_lr}
        with torch.no_grad():
            if "loss_at" in needs:
                stats["loss_at"] = self._loss_at(x, y)
            if needs:
                # A frozen parameter has no gradient: a shared 0-d zero stands in (norm 0, dot 0).
                grads = [p.grad if p.grad is not None else self.zero for p in self.params]
                both = "grad_norm" in needs and "grad_dot_prev_update" in needs \
                    and all(g is not self.zero for g in grads)
                if "grad_norm" in needs and not both:
                    stats["grad_norm"] = self.per_layer.norm(grads)
                if "grad_dot_prev_update" in needs:  # prev holds -u(t-1), see below; its last use,
                    torch._foreach_mul_(self.prev, grads)  # so multiply in place (one call, no copy)
                    if both:  # ‖g‖² and g·(-u) in one reduction
                        squares, dots = self.per_layer.totals(torch._foreach_mul(grads, grads), self.prev)
                        stats["grad_norm"] = squares.sqrt()
                    else:
                        dots = self.per_layer.total(self.prev)
                    stats["grad_dot_prev_update"] = -dots
        controller.stats = stats
        scales = controller.scales(step)  # after backward: p.grad is this step's gradient
        if self.dist.active:  # every rank applies rank 0's scales (a copy: the controller's tensor stays its own)
            scales = self.dist.broadcast_(scales.clone())
        self._step = {"stats": stats, "needs": needs, "probe": probe, "loss": loss, "out": out, "y": y,
                      "totals": totals}
        return scales

    def before_update(self, scales: torch.Tensor) -> None:
        """Under ``no_grad``, before the optimizer step: the trace row, the weights kept."""
        step, probe = self.step, self._step["probe"]
        if step % self.trace_every == 0 and not self.trace_by_replicas:  # the scales as used now
            self.trace[step // self.trace_every].copy_(scales)                # (a controller may reuse its tensor)
        prev = self.prev if self.prev is not None or not probe else [torch.empty_like(p) for p in self.params]
        if prev is not None:
            torch._foreach_copy_(prev, self.params)
        self._step["prev"] = prev

    def after_update(self, scales: torch.Tensor) -> None:
        """Under ``no_grad``, after the optimizer step: the update's statistics, ``observe``,
        the diagnostics, the gradients released, the loss and accuracy kept."""
        step, controller, ctx = self.step, self.controller, self._step
        stats, needs, prev = ctx["stats"], ctx["needs"], ctx["prev"]
        if self.transforms:
            controller.transform_update(step, self.prev_by_layer)
        if prev is not None:  # prev <- theta(t) - theta(t+1) = -u(t)
            torch._foreach_sub_(prev, self.params)
        if "update_norm" in needs and "weight_norm" in needs:  # one reduction for both
            stats["update_norm"], stats["weight_norm"] = self.per_layer.norms(prev, self.params)
        elif "update_norm" in needs:
            stats["update_norm"] = self.per_layer.norm(prev)
        elif "weight_norm" in needs:
            stats["weight_norm"] = self.per_layer.norm(self.params)
        stats["scales"] = scales
        if self.observes:
            controller.observe(step, {k: stats[k] for k in self.needs | {"loss", "global_lr", "scales"}})
        if ctx["probe"]:
            self.diagnostics.record_step(step, stats, prev)
        for p in self.params:
            p.grad = None

        y = ctx["y"]
        if ctx["totals"] is not None:
            loss_sum, correct = ctx["totals"]
            self.loss_sum.add_(loss_sum)
            self.correct.add_(correct.long())
        else:  # counted at the next log point (_settle): no op per step here
            self.pending.append((ctx["loss"].detach(), ctx["out"].detach(), y))
            if len(self.pending) >= PENDING_STEPS:
                self._settle()
        self.seen += self.global_batch if self.dist.active else len(y)
        self._step = None
        self.step += 1
        if self.weight_average is not None:
            self.weight_average.after_step(self.step)

    # ------------------------------------------------------------------ epochs
    def batches(self):
        """This epoch's batches, resuming at ``self.position`` after a restart."""
        n = len(self.train_y)
        epoch_start = getattr(self.model, "epoch_start", None)
        if epoch_start is not None:  # e.g. fastnet's whitening bias, trained for the first epochs
            epoch_start(self.epoch)
        if self.order is None:
            self.order = torch.randperm(n, generator=self.gen, device=self.device)
        while self.position < self.steps_per_epoch:
            index = self.order[self.position * self.batch_size:(self.position + 1) * self.batch_size]
            x = self.augment(index, self.gen)  # all ranks: same draws
            self.position += 1
            self.global_batch = len(index)
            yield self.dist.shard(x), self.dist.shard(self.train_y[index])
        self.order, self.position = None, 0

    def augment(self, index: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The training images ``index`` as this epoch augments them (``data.augment``)."""
        mirror = None
        if self.flip_coins is not None:
            mirror = self.flip_coins[index] ^ bool(self.epoch % 2)
        return augment(self.train_x[index], self.crop_pad, self.flip, gen, reflect=self.reflect, mirror=mirror)

    def _settle(self) -> None:
        """Add the pending steps' losses (``Σ n·loss``) and correct predictions into ``loss_sum``
        and ``correct``: a few ops per log interval (or per ``PENDING_STEPS``) instead of five
        per step. The pending outputs are the steps' detached logits (no graph)."""
        if not self.pending:
            return
        losses, outputs, labels = zip(*self.pending)
        by_size: dict[int, list] = {}
        for loss, y in zip(losses, labels):
            by_size.setdefault(len(y), []).append(loss)
        for size, group in by_size.items():
            self.loss_sum.add_(torch.stack(group).sum(), alpha=size)
        self.correct.add_(torch.cat(outputs).argmax(1).eq(torch.cat(labels)).sum())
        self.pending = []

    def log_interval(self) -> torch.Tensor:
        """Close the log interval ending at this step: its mean training loss (0-d, on the
        device, no sync) goes to row ``loss_logged`` of ``loss_log``."""
        self._settle()
        mean = (self.loss_sum - self.loss_base) / max(self.seen - self.seen_base, 1)
        self.loss_log[self.loss_logged] = mean
        self.loss_base.copy_(self.loss_sum)
        self.seen_base = self.seen
        self.loss_logged += 1
        return mean

    def diverged(self, interval_loss: torch.Tensor | None = None) -> str | None:
        """Why the run diverged (``non_finite`` or ``loss_explosion``), or None. One host
        transfer, at log points and epoch ends only. ``interval_loss`` is a closed log
        interval's mean (from :meth:`log_interval`); without it, the open interval's mean so
        far (an epoch end between log points). It explodes above ``divergence_factor`` times
        the reference ``min(first interval's mean, ln(num_classes))``, the chance-level
        cross-entropy capping the reference, so a first interval that already blew up counts."""
        self._settle()
        finite = torch.isfinite(self.loss_sum)
        if interval_loss is None:
            if self.seen == self.seen_base:
                return None if bool(finite.item()) else "non_finite"
            interval_loss = (self.loss_sum - self.loss_base) / (self.seen - self.seen_base)
        reference = torch.fmin(self.loss_log[0], self.chance_loss)  # fmin: before any interval, ln C
        exploded = interval_loss > self.divergence_factor * reference  # NaN compares False
        finite, exploded = torch.stack([finite & torch.isfinite(interval_loss), exploded]).tolist()
        return "non_finite" if not finite else "loss_explosion" if exploded else None

    @torch.no_grad()
    def evaluate(self, split: str) -> tuple[float, float]:
        x_all, y_all = self.eval_splits[split]
        n = len(y_all)
        x_all, y_all = self.dist.shard(x_all), self.dist.shard(y_all)
        self.model.eval()
        loss = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        for i in range(0, len(y_all), self.eval_batch):
            x, y = self.normalize(x_all[i:i + self.eval_batch]), y_all[i:i + self.eval_batch]
            with self.autocast():
                out = self.tta_logits(x)
            loss += F.cross_entropy(out, y, reduction="sum")
            correct += (out.argmax(1) == y).sum()
        self.model.train()
        if self.dist.active:
            loss, correct = self.dist.sum_(torch.stack([loss, correct.float()])).unbind()
        loss, correct = torch.stack([loss, correct.float()]).tolist()
        return loss / n, correct / n

    def tta_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The logits of a normalised batch under ``trainer.tta``: level 0 the image's; level 1 the
        mean over the image and its mirror; level 2 half that mean and half the level-1 mean over
        the image's two 1-pixel diagonal translations (up-left, down-right; reflect padding), so the
        mirrors are of the translated images: airbench94's six weighted views."""
        logits = self.forward(x).float()
        if self.tta == 0:
            return logits
        mirrored = x.flip(-1)
        logits = 0.5 * (logits + self.forward(mirrored).float())
        if self.tta == 1:
            return logits
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        shifted = [padded[..., :-2, :-2], padded[..., 2:, 2:]]
        shifted += [v.flip(-1) for v in shifted]
        return 0.5 * logits + 0.5 * torch.stack([self.forward(v).float() for v in shifted]).mean(0)

    def log_evaluation(self, wall: float) -> dict:
        """Evaluate and write the records. At an epoch's end ``epoch`` is the epoch count (an
        int); inside an epoch (``eval_every_steps``) the fraction ``step / steps_per_epoch``,
        and the per-layer diagnostics (taken at an epoch's last step) are not repeated."""
        self._settle()
        mid_epoch = self.position != 0
        epoch = round(self.step / self.steps_per_epoch, 6) if mid_epoch else self.epoch
        row = {"epoch": epoch, "step": self.step,
               "train_loss": self.loss_sum.item() / max(self.seen, 1),
               "train_acc": self.correct.item() / max(self.seen, 1)}
        for split in self.eval_splits:
            row[f"{split}_loss"], row[f"{split}_acc"] = self.evaluate(split)
            self.best[split] = max(self.best.get(split, 0.0), row[f"{split}_acc"])
        row["lr"] = float(self.lr_host[min(self.step, self.plan.total_steps) - 1])
        row["wall_s"] = wall
        self.records.add_metrics(row)
        row = self.records.metrics[-1]  # as written: non-finite values are None
        layer_rows = []
        if not mid_epoch:
            layer_rows = self.diagnostics.at_evaluation(self.epoch, self.step)
            self.records.write_text(LAYER_STATS, self.diagnostics.csv())
        tables = self.controller.records()
        for name, rows in tables.items():
            self.records.write_text(f"{name}.csv", rows_csv(rows))
        new_trace = self.flush_trace()
        new_loss = self.flush_train_loss()
        self.logger.log_evaluation(row, self.records.trace_header, new_trace, layer_rows,
                                   tables=tables, train_loss_rows=new_loss)
        self.loss_base.sub_(self.loss_sum)  # the open log interval keeps its sum across the reset
        self.seen_base -= self.seen
        self.loss_sum.zero_()
        self.correct.zero_()
        self.seen = 0
        return row

    def flush_trace(self) -> list[list]:
        """Write the trace rows logged since the last flush to llr.csv; return them."""
        rows_done = math.ceil(self.step / self.trace_every)
        if rows_done <= self.trace_flushed:
            return []
        values = self.trace[self.trace_flushed:rows_done].cpu().tolist()
        rows = []
        for i, scales in enumerate(values, start=self.trace_flushed):
            step = i * self.trace_every
            rows.append([step, round(step / self.plan.total_steps, 6), float(self.lr_host[step]), *scales])
        header = ["step", "progress", "global_lr", *[layer.name for layer in self.layers]]
        self.records.add_trace(header, rows)
        self.trace_flushed = rows_done
        return rows

    def flush_train_loss(self) -> list[list]:
        """Write the log intervals closed since the last flush to train_loss.csv; return them."""
        if self.loss_logged <= self.loss_flushed:
            return []
        values = self.loss_log[self.loss_flushed:self.loss_logged].cpu().tolist()
        rows = []
        for k, value in enumerate(values, start=self.loss_flushed):
            step = min((k + 1) * self.log_every, self.plan.total_steps)
            if k == self.loss_logged - 1 and self.step < step:  # an interval closed early (divergence)
                step = self.step
            rows.append([step, round(step / self.steps_per_epoch, 6), value, float(self.lr_host[step - 1])])
        self.records.add_train_loss(rows)
        self.loss_flushed = self.loss_logged
        return rows

    # ------------------------------------------------------------------ the run
    def fit(self) -> dict:
        """Train to the end (or a stop) and return the summary."""
        loop = self.loop()
        try:
            batch = next(loop)
            while True:
                try:
                    self.train_step(*batch)
                except BaseException as error:
                    loop.throw(error)  # the loop records the failure, writes the summary, re-raises
                    raise
                batch = loop.send(None)
        except StopIteration as done:
            return done.value

    def loop(self):
        """The run around its steps, as a generator: it yields each step's batch ``(x, y)``, the
        caller trains on it (``train_step``, or a batched step over replicas) and resumes the
        loop, which logs, evaluates, checkpoints and stops; its return value is the summary.
        An exception of the step is thrown into it (``throw``) to be recorded."""
        from tqdm.auto import tqdm

        start = time.perf_counter() - self.wall_before
        records = self.records
        self.dist.barrier()  # every rank has decided how to resume before rank 0 writes
        if self.step == 0:
            records.write_text(CONFIG, OmegaConf.to_yaml(self.cfg, resolve=True))
            records.write_json(ENV, {**environment(self.device), "world_size": self.dist.world_size,
                                     "data_source": self.data_source})  # a running run's setting needs it
            records.write_layers(self.layer_rows)
            records.write_text(METRICS, "")  # present from the start, even if no evaluation comes
            if not self.quiet:
                print(_format_table(self.layer_rows))
                print(f"augmentation: {self.augmentation()}")
        bar = tqdm(total=self.plan.total_steps, initial=self.step, disable=self.quiet, unit="step",
                   desc=f"{self.cfg.controller.name}", dynamic_ncols=True, leave=True)
        total, eval_steps = self.plan.total_steps, self.eval_every_steps
        handlers = self._catch_signals()
        try:
            while self.epoch < self.epochs and self.status == "running" and not self.stopping:
                log_point = False
                for x, y in self.batches():
                    yield x, y
                    log_point = self.step % self.log_every == 0 or self.step == total
                    if log_point:  # close the log interval, check it: one host transfer
                        bar.update(self.step - bar.n)
                        self.reason = self.diverged(self.log_interval())
                        if self.reason:
                            self.status = "diverged"
                            break
                    if eval_steps and self.step % eval_steps == 0 and self.position < self.steps_per_epoch:
                        row = self.log_evaluation(time.perf_counter() - start)  # inside the epoch
                        bar.set_postfix(epoch=row["epoch"], loss=_short(row["train_loss"]),
                                        test_acc=_short(row["test_acc"], 4))
                    if self.decide_stop(log_point):  # between steps: the state is whole
                        break
                if self.status != "running" or self.stopping:
                    break
                self.epoch += 1
                if not log_point:  # the last step was not just checked
                    self.reason = self.diverged()
                    if self.reason:
                        self.log_interval()  # the partial interval, so train_loss.csv shows it
                        self.status = "diverged"
                        break
                if (self.epoch % self.eval_every == 0 or self.epoch == self.epochs
                        or (eval_steps and self.step % eval_steps == 0)):
                    row = self.log_evaluation(time.perf_counter() - start)
                    bar.set_postfix(epoch=self.epoch, loss=_short(row["train_loss"]),
                                    test_acc=_short(row["test_acc"], 4))
                bar.update(self.step - bar.n)
                if self.cfg.trainer.checkpoint:
                    self.save_checkpoint(start)
            if self.status == "running" and self.epoch < self.epochs:  # stopped by a signal
                self.status, self.error = "interrupted", signal.Signals(self.stop_signal).name
                if self.cfg.trainer.checkpoint:
                    self.save_checkpoint(start)
            elif self.status == "running":
                self.status = "finished"
        except KeyboardInterrupt:  # a second signal, or Ctrl-C without our handler: no new checkpoint
            self.status, self.error = "interrupted", "KeyboardInterrupt"
            raise
        except Exception as error:
            self.status, self.error = "failed", f"{type(error).__name__}: {error}"
            raise
        finally:
            for number, handler in handlers.items():
                signal.signal(number, handler)
            bar.close()
            try:
                self.flush_trace()
                self.flush_train_loss()
                summary = self.summary(time.perf_counter() - start)
                records.write_json(SUMMARY, summary)
                self.logger.finish(summary)
            finally:
                records.close()
        if self.status == "interrupted" and self.stop_signal is not None and self.own_signals:
            print(f"interrupted by {self.error} at step {self.step}; resume with trainer.resume=auto "
                  f"and the same run directory ({records.dir})", file=sys.stderr)
            previous = handlers.get(self.stop_signal)
            if _chainable(previous):  # e.g. submitit's: requeue this job, which resumes from the checkpoint
                previous(self.stop_signal, None)
            raise Interrupted(self.stop_signal)
        if not self.quiet:
            status = f"{summary['status']} ({self.reason})" if self.reason else summary["status"]
            print(f"{status}: test acc {summary['final_test_acc']} (best {summary['best_test_acc']}) "
                  f"after {self.step} steps, {summary['wall_s']:.1f} s -> {records.dir}")
        return summary

    def augmentation(self) -> str:
        """The training augmentation in words (data.augment)."""
        crop = f"random crop (pad {self.crop_pad}{', reflect' if self.reflect else ''})"
        flip = "horizontal flip" + (" (alternating by epoch)" if self.flip_coins is not None else "")
        parts = ([crop] if self.crop_pad else []) + ([flip] if self.flip else [])
        return " + ".join(parts) or "none"

    def close(self) -> None:
        """Release the run directory (``fit`` does so when it ends)."""
        self.records.close()

    def _catch_signals(self) -> dict:
        """Route SIGTERM/SIGINT/SIGUSR1 to a flag read at step boundaries (main thread only);
        a second signal raises KeyboardInterrupt at once. Returns the handlers to restore."""
        def on_signal(number, frame):
            if self.stop_signal is not None:
                raise KeyboardInterrupt
            self.stop_signal = number

        if threading.current_thread() is not threading.main_thread() or not self.own_signals:
            return {}
        numbers = list(SIGNALS)
        if _chainable(signal.getsignal(signal.SIGUSR2)):  # submitit's preemption/timeout signal
            numbers.append(signal.SIGUSR2)
        return {number: signal.signal(number, on_signal) for number in numbers}

    def decide_stop(self, log_point: bool) -> bool:
        """Stop now? After a signal: at this step boundary; under torchrun, at the next log
        point, where the ranks agree (one all-reduce there, none in between)."""
        if self.dist.active:
            if log_point:
                agreed = self.dist.max_(torch.tensor([self.stop_signal or 0], device=self.device))
                self.stop_signal = int(agreed.item()) or None
                self.stopping = self.stop_signal is not None
        else:
            self.stopping = self.stop_signal is not None
        return self.stopping

    def save_checkpoint(self, start: float) -> None:
        self.wall_before = time.perf_counter() - start
        if self.dist.main:
            checkpoint.save(self.state_dict(), self.records.dir, self.step)

    def summary(self, wall: float) -> dict:
        last = self.records.metrics[-1] if self.records.metrics else {}
        summary = {
            "status": self.status,
            "final_test_acc": last.get("test_acc"),
            "best_test_acc": self.best.get("test"),
            "chance_acc": self.chance_acc,
            "final_test_loss": last.get("test_loss"),
            "final_train_loss": last.get("train_loss"),
            "final_train_acc": last.get("train_acc"),
            "steps": self.step,
            "epochs_done": self.epoch,
            "wall_s": wall,
            "controller": self.cfg.controller.name,
            "model": self.cfg.model.name,
            "data": self.data_name,
            "synthetic": self.synthetic,
            "data_source": self.data_source,
            "seed": int(self.cfg.seed),
            "study": self.cfg.study,
            "world_size": self.dist.world_size,
            "layers": [layer.name for layer in self.layers],
        }
        if "val" in self.eval_splits:
            summary.update(final_val_acc=last.get("val_acc"), final_val_loss=last.get("val_loss"),
                       best_val_acc=self.best.get("val"))
        if self.status == "diverged":
            summary["reason"] = self.reason
            summary["diverged_at_step"] = self.step
        if self.error:
            summary["error"] = self.error
        if self.resumes:
            summary["resumes"] = self.resumes
        summary["layer_stats"] = self.diagnostics.summary()
        return summary

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        self.flat_step.sync_state()
        state = self._state()
        # A replica's tensors are views of the replicas' shared storage: save its own part only.
        return _own_copies(state) if self.shares_storage else state

    def _state(self) -> dict:
        return {
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "controller": self.controller.state_dict(),
            "generator": self.gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
            "step": self.step, "epoch": self.epoch, "position": self.position, "order": self.order,
            "loss_sum": self.loss_sum, "correct": self.correct, "seen": self.seen,
            "pending": list(self.pending),  # kept, not summed: a resumed run sums as an uninterrupted one
            "prev": self.prev, "trainable": self.trainable, "best": dict(self.best),
            "trace": self.trace, "trace_flushed": self.trace_flushed,
            "records": self.records.state_dict(), "wall_s": self.wall_before,
            "diagnostics": self.diagnostics.state_dict(),
            "loss_log": self.loss_log, "loss_base": self.loss_base, "seen_base": self.seen_base,
            "loss_logged": self.loss_logged, "loss_flushed": self.loss_flushed,
            "lookahead_generator": self.lookahead_gen.get_state(), "resumes": list(self.resumes),
            "weight_average": self.weight_average.state_dict() if self.weight_average is not None else None,
            "precision": self.precision,
        }

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("precision")  # device is a free key, but precision=auto resolves by device
        if saved is not None and saved != self.precision:
            raise UserError(f"this run trained in {saved} and would continue in {self.precision} here "
                            f"(trainer.precision={self.cfg.trainer.precision} on {self.device.type}); "
                            f"resume it on the kind of device it ran on, or start a new run")
        self.model.load_state_dict(state["model"])
        self.set_trainable(state["trainable"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.flat_step.load_state()
        self.controller.load_state_dict(state["controller"])
        self.gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.order = state["order"]
        self.pending = list(state.get("pending", []))
        self.loss_sum.copy_(state["loss_sum"])
        self.correct.copy_(state["correct"])
        self.seen = state["seen"]
        if self.prev is not None:
            torch._foreach_copy_(self.prev, state["prev"])
        self.best = dict(state["best"])
        self.trace.copy_(state["trace"])
        self.trace_flushed = state["trace_flushed"]
        self.records.load_state_dict(state["records"])
        self.wall_before = state["wall_s"]
        self.diagnostics.load_state_dict(state["diagnostics"])
        if self.weight_average is not None and state.get("weight_average") is not None:
            self.weight_average.load_state_dict(state["weight_average"])
        if "lookahead_generator" in state:
            self.lookahead_gen.set_state(state["lookahead_generator"])
            self.resumes = list(state["resumes"])
        if "loss_log" in state:
            self.loss_log.copy_(state["loss_log"])
            self.loss_base.copy_(state["loss_base"])
            self.seen_base = state["seen_base"]
            self.loss_logged, self.loss_flushed = state["loss_logged"], state["loss_flushed"]
        else:  # a checkpoint from before train_loss.csv: its rows start here
            self.loss_base.copy_(self.loss_sum)
            self.seen_base = self.seen
            self.loss_logged = self.loss_flushed = self.step // self.log_every


def _own_copies(value):
    """``value`` with each tensor that views a larger storage replaced by a copy of itself."""
    if isinstance(value, torch.Tensor):
        return value.clone() if value.untyped_storage().nbytes() > value.nbytes else value
    if isinstance(value, dict):
        return {k: _own_copies(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_own_copies(v) for v in value)
    return value


def _chainable(handler) -> bool:
    """A Python signal handler someone installed before the run (submitit's), to be called
    after the run's own checkpoint; not Python's default SIGINT handler."""
    return callable(handler) and handler is not signal.default_int_handler


def chance_accuracy(labels: torch.Tensor) -> float | None:
    """The test accuracy of always answering the test split's most frequent class: its
    majority-class frequency (``1 / num_classes`` on balanced data, more on imbalanced data).
    A run near it has learned nothing."""
    if len(labels) == 0:
        return None
    return round(torch.bincount(labels.cpu()).max().item() / len(labels), 6)


def _short(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _format_table(rows: list[dict]) -> str:
    lines = [f"{'#':>3}  {'layer':<32} {'params':>10}  group"]
    lines += [f"{r['index']:>3}  {r['name']:<32} {r['params']:>10,}  {r['group']}" for r in rows]
    return "\n".join(lines)


def pick_device(name: str) -> torch.device:
    """``device=auto|cpu|cuda|cuda:N`` as a torch device; one line if it is not visible."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name} but no CUDA GPU is visible; use device=cpu or device=auto")
    return device


def build_run(cfg: DictConfig, out_dir: str | Path, *, model: nn.Module | None = None, data: Dataset | None = None,
              controller: Controller | str | None = None, storage=None) -> Run:
    """Assemble a run from its checked config; ``model``, ``data`` or ``controller`` passed in
    replace the ones the config names. The records then name what was passed: a passed model
    always (``model: {name: <class>, passed_in: true}``), data or a controller when its name
    differs from the config's (the same name keeps the config's description of it)."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))  # ours to edit: records name passed parts
    dist, device_name = setup(cfg.device)
    device = pick_device(device_name)
    torch.manual_seed(cfg.seed)
    if data is None:
        data = load_data(cfg.data)
    elif data.name != cfg.data.name:
        cfg.data = {"name": data.name, "source": data.source, "augment": cfg.data.augment}
    if model is None:
        options = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "name"}
        model = build_model(cfg.model.name, data.in_channels, data.image_size, data.num_classes, **options)
    else:
        cfg.model = {"name": type(model).__name__, "passed_in": True}
    if isinstance(controller, str):
        cfg.controller = {"name": controller}
        controller = None
    if controller is None:
        controller = build_controller(cfg.controller)
    elif getattr(controller, "registry_name", None) != cfg.controller.name:
        cfg.controller = {"name": getattr(controller, "registry_name", type(controller).__name__), "passed_in": True}
    return Run(cfg, out_dir, data=data, model=model, controller=controller, device=device, dist=dist, storage=storage)


def resume_mode(cfg: DictConfig) -> str:
    """``trainer.resume`` as ``"false"``, ``"true"`` or ``"auto"``."""
    value = cfg.trainer.resume
    return "auto" if value == "auto" else "true" if value is True else "false"


def resume_if_asked(run: Run) -> dict | None:
    """Decide what ``run``'s directory allows, by ``trainer.resume``:

    * an empty directory: start (``true`` refuses: nothing to continue);
    * a run already there: ``false`` refuses; ``true``/``auto`` continue it from its newest
      intact checkpoint, records rolled back to that checkpoint, or return its summary when it
      is already over (finished or diverged) and there is nothing to do; ``auto`` starts over
      a run killed before its first checkpoint.

    The run there must be this one: a config differing in any key that changes the
    computation (:data:`meta_llr.config.FREE_KEYS` excepted) is refused in one line
    listing the keys. Every refusal releases the directory. Returns the summary of a run
    that is over, else None (then call ``run.fit()``)."""
    try:
        return _resume(run)
    except BaseException:
        run.records.close()
        raise


def _resume(run: Run) -> dict | None:
    mode, directory = resume_mode(run.cfg), run.records.dir
    found = checkpoint.checkpoints(directory)
    if not (found or any((directory / name).exists() for name in (CONFIG, METRICS, SUMMARY))):
        if mode == "true":
            raise UserError(f"trainer.resume=true but {directory} holds no run to continue; "
                            f"trainer.resume=auto starts one when there is none")
        return None
    if mode == "false":
        raise UserError(f"{directory} already holds a run; continue it with trainer.resume=auto "
                        f"(or true), or give this run another directory")
    current = OmegaConf.to_container(run.cfg, resolve=True)

    def refuse_if_changed(saved: dict | None, where: str) -> None:
        changed = checkpoint.config_diff(saved, current) if saved is not None else []
        if changed:
            raise UserError(f"{directory} holds a run with another config ({where}): {'; '.join(changed)}; "
                            f"resume with the same settings or give this run another directory")

    config_file = directory / CONFIG
    saved_config = OmegaConf.to_container(OmegaConf.load(config_file), resolve=True) if config_file.exists() else None
    summary = _read_summary(directory / SUMMARY)
    if summary is not None and summary.get("status") in ("finished", "diverged"):
        refuse_if_changed(saved_config, CONFIG)
        if not run.quiet:
            print(f"{directory}: already {summary['status']}, nothing to do")
        run.records.close()
        return summary
    loaded = checkpoint.load_latest(directory, run.device)
    if loaded is None:  # records but no checkpoint: killed in its first epoch
        if mode == "true":
            raise UserError(f"trainer.resume=true but {directory} has no checkpoint (the run stopped before "
                            f"its first); trainer.resume=auto starts it over")
        refuse_if_changed(saved_config, CONFIG)
        if run.dist.main:  # the old attempt's tables (llr.csv, layer_stats.csv, a controller's) go too
            for stale in directory.glob("*.csv"):
                if stale.name != LAYERS:
                    stale.unlink()
        run.records.rewrite()
        return None
    state, path, damaged = loaded
    refuse_if_changed(state.get("config", saved_config), path.name)
    run.load_state_dict(state)
    run.resumes.append({"from_step": run.step, "checkpoint": path.name, **({"damaged": damaged} if damaged else {})})
    if run.dist.main:  # damaged newer checkpoints leave the rotation (kept for a look), so two intact remain
        for newer in checkpoint.checkpoints(directory):
            if newer == path:
                break
            newer.rename(newer.with_name(newer.name + ".damaged"))
            checkpoint.digest_path(newer).unlink(missing_ok=True)
    run.records.rewrite()
    if run.records.metrics:  # as of the checkpoint's last evaluation (a controller's tables: at the next)
        run.records.write_text(LAYER_STATS, run.diagnostics.csv())
    return None


def _read_summary(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def train(cfg: DictConfig, out_dir: str | Path) -> dict:
    """Run one training in ``out_dir`` (or continue it, or return its summary when it is over;
    see :func:`resume_if_asked`). ``replicas=S > 1``: S runs in ``out_dir/s<seed>``, one per
    seed, trained together (:func:`meta_llr.replicas.train_replicas`); their summaries."""
    if int(cfg.get("replicas", 1)) > 1:
        from meta_llr.replicas import train_replicas

        summaries = train_replicas(cfg, out_dir)
        worst = [s["status"] for s in summaries if s["status"] != "finished"]
        return {"status": worst[0] if worst else "finished", "replicas": summaries}
    run = build_run(cfg, out_dir)
    done = resume_if_asked(run)
    return done if done is not None else run.fit()
