"""The controller contract: how a layer-level learning-rate (LLR) policy talks to the loop.

Every step the training loop asks the controller for one scale factor per layer and
trains with

    lr_layer(t) = global_lr(t) * scale_layer(t)

where ``global_lr(t)`` is the global LR schedule (``schedule=...``) and the scales are the
controller's. A controller is a subclass of :class:`Controller` registered by name with
``meta_llr.registry.register``; ``controller=NAME`` selects it, and its ``__init__`` keyword
arguments are its options (``controller.KEY=V``, typed by their annotations, defaults written
once in the signature). Adding a controller is one Python file in ``baselines/`` or
``controllers/`` (the registry imports both packages), or a plugin package (entry point group
``meta_llr.controllers``).

Call order, per run::

    controller = Cls(**options)                  # the options, typed and checked
    controller.setup(layers, plan)               # once, before the first step
    for step in range(plan.total_steps):
        mask = controller.trainable(step)        # optional, host-side, before the forward
        ... forward, loss, backward ...          # p.grad now holds this step's gradient
        ... the declared statistics that exist before the update (loss, global_lr, grad_norm,
            grad_dot_prev_update, loss_at), batched, as ``controller.stats`` ...
        s = controller.scales(step)              # after backward, before the optimizer step
        ... optimizer step with lr_l = global_lr(step) * s[l] ...
        controller.transform_update(step, before)  # optional (see below)
        controller.observe(step, stats)          # after the step, if overridden: all the stats
    controller.state_dict() / load_state_dict()  # checkpoints, at any step boundary

``scales(step)`` may therefore read this step's gradients (``p.grad``) and the pre-update
statistics in ``self.stats`` (the same mapping ``observe`` receives, computed once): trust
ratios (LARS, LAMB) use the current gradient, as published. A controller that ignores them
returns what it would have returned before the forward pass.

Rules a controller must keep (checked for every registered controller by
``tests/test_contract.py``):

* ``scales(step)`` returns a 1-D float32 tensor of length ``len(layers)`` on
  ``plan.device``, finite and non-negative. Zero is allowed only for a layer that
  ``trainable(step)`` reports frozen.
* No host-device synchronisation inside a step: no ``.item()``, ``.cpu()``, ``.tolist()``,
  ``float(tensor)`` or Python ``if`` on a device value in ``scales``, ``observe`` or
  ``transform_update``. Keep state as device tensors and update it with tensor ops.
* ``needs`` names the per-step statistics the controller reads (in ``scales`` through
  ``self.stats``, or in ``observe``); the loop computes exactly those, once, in one batched
  pass. Hooks are declared one way: the loop calls ``observe``, ``trainable`` and
  ``transform_update`` only if the controller overrides them (:meth:`Controller.hooks`).
  A controller that needs nothing costs nothing.
* ``state_dict()`` holds everything needed to continue bit-for-bit after a restart.

Statistics (``stats`` in ``observe``), each a device tensor, per layer ``[L]`` unless noted;
a layer's statistic covers all of that layer's parameter tensors together:

==========================  ==========================================================
``loss``                    0-d: this step's training loss (mean over the batch)
``global_lr``               0-d: the global LR used at this step
``scales``                  ``[L]``: the scales used at this step
``grad_norm``               ``‖g_l(t)‖₂``, gradient of this step
``weight_norm``             ``‖θ_l(t+1)‖₂``, after the step
``update_norm``             ``‖u_l(t)‖₂`` with ``u_l(t) = θ_l(t+1) − θ_l(t)``, the update applied
``grad_dot_prev_update``    ``g_l(t) · u_l(t−1)`` (0 at the first step); the hypergradient
                            of the loss w.r.t. layer l's LR is ``∂L(θ(t))/∂η_l(t−1) =
                            g_l(t)·u_l(t−1)/η_l(t−1)`` (``u = −η·d``, so ``∂θ(t)/∂η = u/η``)
``loss_at``                 not a tensor: a function ``loss_at(params) -> 0-d loss`` giving
                            this step's training loss on this step's batch (same augmented
                            inputs) with ``params`` in place of the model's parameters
                            (a list aligned with ``[p for layer in layers for p in
                            layer.params]``); BatchNorm running statistics are not touched.
                            Differentiable: ``torch.autograd.grad(loss_at(ps), ps)`` is a
                            gradient on the same batch at other weights (one forward and
                            backward per call; ``hessian_secant same_batch=true``).
==========================  ==========================================================

Controllers that keep their own per-element state (secant estimates, Adam moments) read
the tensors directly: ``layer.params`` (all of the layer's parameters), ``layer.weight``
(its kernel), and ``p.grad`` during ``observe`` (gradients are cleared after it).

Three optional hooks:

* ``trainable(step) -> list[bool] | None``: which layers train at this step. Host-side and
  a pure function of ``step`` (no device values). A layer reported ``False`` gets
  ``requires_grad=False`` (no gradient is computed, the optimizer skips it); this is where
  FreezeOut and gradual unfreezing get their speed. ``None`` (the default) means all train.
* ``transform_update(step, before)``: for controllers that change the *direction* of the
  update, not just its size (Layca). Called after the optimizer step with ``before[l][k]``,
  a copy of ``layers[l].params[k]`` from before the step; the controller rewrites
  ``layers[l].params[k]`` in place.

* ``records() -> dict[str, list[dict]]``: tables the controller wants written, called by the
  loop at every evaluation (host-side; may sync). Each ``name: rows`` is written atomically
  as ``<name>.csv`` in the run directory (header = the union of the rows' keys, in order of
  first appearance). Keep the values on the device during steps and convert them here.

``scale_1d`` (default True): whether a layer's 1-D parameters (biases, norm affine
parameters) follow the layer's scale; ``False`` keeps them at the global LR (LARS).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

STATS = frozenset(
    {"loss", "global_lr", "scales", "grad_norm", "weight_norm", "update_norm", "grad_dot_prev_update", "loss_at"}
)


@dataclass
class Layer:
    """One unit that gets its own LR: a weighted module (Conv, Linear) with its bias and the
    normalisation layer that follows it, or a contiguous group of such (``layers.groups=K``)."""

    index: int                  # 0 = first in forward execution order
    name: str                   # module name, or "first..last" for a group
    depth: float                # index / (L - 1): 0 for the first layer, 1 for the last
    params: list[torch.Tensor]  # every trainable tensor whose LR is this layer's
    weight: torch.Tensor        # the kernel of the layer's (first) weighted module
    modules: list[str] = field(default_factory=list)  # module names it covers


@dataclass
class Lookahead:
    """What a controller that looks ahead (``rnn_meta learn=unrolled``) gets from the run."""

    model: nn.Module                                   # the trained module (its live parameters)
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # loss_fn(outputs, y), the run's loss
    # sample_batches(k) -> ([(x, y)] * k, (x, y)): k fresh augmented training batches and one
    # held-out batch (the validation split), inputs normalised, on the device; its own RNG stream.
    sample_batches: Callable[[int], tuple[list[tuple[torch.Tensor, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]]
    # The run's optimizer (its state: momentum buffers), set once the run has built it (after
    # the controller's setup): read it when looking ahead, never step it.
    optimizer: torch.optim.Optimizer | None = None
    # Whether sample_batches has a held-out split to draw from (the loop: data.val_size > 0), so
    # a controller can refuse at its first step rather than at its first lookahead.
    held_out: bool = True


@dataclass(frozen=True)
class OptimizerSpec:
    """The run's optimizer (``trainer.*``), for controllers whose rule depends on it (LAMB's
    trust ratio over the AdamW direction, a lookahead through the real update)."""

    name: str = "sgd"                 # sgd | adamw
    momentum: float = 0.0             # SGD
    nesterov: bool = False            # SGD (only with momentum > 0)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW
    eps: float = 1e-8                 # AdamW (torch's default)
    weight_decay: float = 0.0         # L2 for SGD, decoupled for AdamW
    decay_1d: bool = True             # decay on biases and norm parameters too
    norm_lr_mult: float = 1.0         # LR multiplier of normalisation layers' parameters


@dataclass
class Plan:
    """What the run will do: known before the first step."""

    total_steps: int
    steps_per_epoch: int
    epochs: int
    device: torch.device
    lr_table: torch.Tensor      # [total_steps] float32 on device: global_lr(step)
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    lookahead: Lookahead | None = None  # what a lookahead controller may use of the run
    # The mean over data-parallel ranks (torchrun) of a quantity each rank computed from its own
    # shard (e.g. from ``loss_at``), in place on the device, no host sync; identity in one process.
    reduce: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda tensor: tensor)

    def global_lr(self, step: int) -> torch.Tensor:
        """0-d device tensor, the global LR at ``step`` (a view: no copy, no sync)."""
        return self.lr_table[min(step, self.total_steps - 1)]

    def progress(self, step: int) -> float:
        """Fraction of training done before ``step``: 0 at the first step, → 1 at the end."""
        return step / self.total_steps


class Controller(ABC):
    """Base class of every LLR controller; the module docstring is the contract."""

    needs: frozenset[str] = frozenset()
    scale_1d: bool = True
    # Config overrides the controller needs to run as intended (e.g. lamb: AdamW); the contract
    # test, the bench and the health table apply them, and docs/controllers.md lists them.
    requires: tuple[str, ...] = ()

    stats: Mapping[str, torch.Tensor] = {}  # set by the loop before each scales(step)

    def setup(self, layers: Sequence[Layer], plan: Plan) -> None:
        self.layers = list(layers)
        self.plan = plan
        self.num_layers = len(layers)
        self.depths = torch.tensor([layer.depth for layer in layers], dtype=torch.float32)

    @abstractmethod
    def scales(self, step: int) -> torch.Tensor:
        """Per-layer LR scale factors for ``step``: float32 ``[L]`` on ``plan.device``."""

    def observe(self, step: int, stats: Mapping[str, torch.Tensor]) -> None:
        """Receive this step's statistics (the ones named in ``needs``)."""

    def trainable(self, step: int) -> list[bool] | None:
        return None

    def transform_update(self, step: int, before: Sequence[Sequence[torch.Tensor]]) -> None:
        """Rewrite the layers' parameters after the optimizer step (see the contract)."""

    def records(self) -> dict[str, list[dict]]:
        """Tables to write as ``<name>.csv`` at each evaluation (host-side). Called exactly once
        per evaluation, so a controller may append a row per call (its rows belong in its
        ``state_dict`` then, for resumes)."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: Mapping) -> None:
        pass

    @classmethod
    def hooks(cls) -> frozenset[str]:
        """The optional hooks this controller uses: the ones it overrides (the one way a
        controller declares a capability)."""
        return frozenset(name for name in ("observe", "trainable", "transform_update")
                         if getattr(cls, name) is not getattr(Controller, name))

    @classmethod
    def example_options(cls, tmp_dir) -> dict:
        """Options that make a runnable example (for tests and docs) when the defaults
        alone cannot, e.g. a file to read written into ``tmp_dir``; default ``{}``."""
        return {}
