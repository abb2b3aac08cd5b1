"""Per-layer diagnostics recorded at every evaluation, whatever the controller.

For each layer l, at the last training step before an evaluation:

* ``rotation``: layer rotation, the cosine distance ``1 − cos(θ_l(t), θ_l(0))`` between the
  layer's kernels now and at initialisation (Carbonnelle & De Vleeschouwer, "Layer rotation:
  a surprisingly powerful indicator of generalization in deep networks?", arXiv 1806.01603);
  needs one copy of the initial kernels, ``diagnostics.rotation=false`` turns it off.
* ``weight_norm`` ``‖θ_l‖``, ``grad_norm`` ``‖g_l‖``, ``update_ratio`` ``‖u_l‖/‖θ_l‖``, and
  ``effective_lr`` ``η_l = global_lr · scale_l`` of that step.
* ``eps_over_lr`` ``ε_l/η_l`` with ``ε_l = Σ|u_l| / Σ|g_l(θ(t+1); B′) − g_l(θ(t); B_t)|``, the
  plain minibatch L1 secant of Smith & Topin ("Super-Convergence", arXiv 1708.07120; the
  ``hessian_secant form=gradients`` estimate, per layer): ``u = θ(t+1) − θ(t)`` the step's update,
  ``g(θ(t); B_t)`` the step's own gradient and ``g(θ(t+1); B′)`` the gradient after the step on
  another batch of the same size (the fixed probe batch below: the first ``batch_size`` training
  images, no augmentation), so the difference carries minibatch noise as the controller's does.
  It shows that secant's circularity: ``Σ|u_l| ≈ η_l·Σ|m_l|`` (``m`` the momentum buffer)
  while ``Σ|Δg_l|`` is dominated by the noise of the two batches, so ``ε_l/η_l`` is ≈ 2–3 in
  every layer whatever its curvature (compare ``1/(effective_lr·curvature)``). Cost: one forward
  and backward on one batch per evaluation.

Curvature probe (``diagnostics.curvature_every=N``, off at 0): at every evaluation whose
epoch is a multiple of N, on the fixed batch (BatchNorm on batch statistics as in training),
along each layer's last update ``u_l`` (a layer's parameter tensors together, other layers held
fixed). ``H`` is the Hessian of the training loss on that batch, ``H_ll`` its diagonal block
for layer l, ``H_lm`` the cross-layer blocks:

* ``curvature`` ``u_lᵀ H_ll u_l / ‖u_l‖²``, exact, from a Hessian-vector product by
  forward-over-reverse differentiation (``torch.func.jvp`` of ``torch.func.grad``), one per
  layer: the curvature of the loss along the layer's own step (a Rayleigh quotient of
  ``H_ll``, between its extreme eigenvalues), what a quadratic model of the loss along that
  step uses; ``lr_x_curvature`` is ``effective_lr · curvature`` (plain gradient descent along
  that direction is stable below 2);
* ``curvature_full`` ``u_lᵀ (H u)_l / ‖u_l‖²``, exact, with all layers moving by their last
  update together (cross-layer blocks ``H_lm u_m`` included): what a per-layer secant taken
  over a training step measures in the small-step limit, so ``curvature`` vs
  ``curvature_full`` shows how much of a layer's secant is other layers' doing;
* ``secant_curvature`` ``(g_l(θ) − g_l(θ − u))·u_l / ‖u_l‖²``, the finite-difference secant
  along the same step and batch: ``curvature_full`` over the whole step instead of at a point
  (equal to it on any quadratic, where ``H`` is constant);
* ``secant_l1`` ``Σ|g_l(θ) − g_l(θ − u)| / Σ|u_l|``, the inverse of Smith & Topin's L1 secant
  estimate ``ε* = Σ|Δθ| / Σ|Δg|`` without minibatch noise (same batch at both points); on a
  quadratic it is ``‖(H u)_l‖₁ / ‖u_l‖₁``, an L1 ratio, not a curvature along ``u``: it equals
  ``curvature`` only when ``H_ll`` is a multiple of the identity and ``H_lm u_m = 0``
  (H = diag(1, 4), u = (2, 1): ``secant_l1`` = 6/3 = 2.0 while ``curvature`` = 8/5 = 1.6); in
  general it weighs the rows of ``H u`` by their absolute values and is bounded by the largest
  absolute column sum of ``H``, not by its largest eigenvalue; ``eps_over_lr_same_batch`` is
  ``1 / (effective_lr · secant_l1)``, the same-batch counterpart of ``eps_over_lr``.

On the separable, isotropic quadratic ``½Σ_l h_l‖θ_l − θ*_l‖²`` (``H_ll = h_l·I``, no
cross-layer blocks) all four equal ``h_l``; off it only ``curvature`` is the curvature along the
layer's step.

Cost: one forward-over-reverse pass per layer (plus one), vmapped, and two gradients, on one batch, every N
epochs; one copy of the last update (kept at the last step of each epoch), one model copy
while probing. ``torch.func`` cannot differentiate BatchNorm updating its running stats in
place, so the probe differentiates a copy prepared with
``torch.func.replace_all_batch_norm_modules_`` (batch statistics, no buffer updates).

Rows go to ``layer_stats.csv`` (one per evaluation and layer); the last values per layer go
into ``summary.json`` under ``layer_stats``.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence

import torch

from meta_llr.errors import UserError
from meta_llr.records import rows_csv

LAYER_STATS = "layer_stats.csv"


def kernels(layer) -> list[torch.Tensor]:
    return [p for p in layer.params if p.dim() > 1]


class Diagnostics:
    needs = frozenset({"grad_norm", "update_norm", "weight_norm"})

    def __init__(self, cfg: Mapping, layers, device: torch.device):
        self.layers = layers
        self.device = device
        self.rotation = bool(cfg.get("rotation", True))
        self.initial = ([[p.detach().clone() for p in kernels(layer)] for layer in layers]
                        if self.rotation else None)
        self.curvature_every = int(cfg.get("curvature_every", 0) or 0)
        if self.curvature_every < 0:
            raise UserError(f"diagnostics.curvature_every must be >= 0 (0 = off), got {self.curvature_every}")
        self.probe = None
        self.owner = torch.tensor([l for l, layer in enumerate(layers) for _ in layer.params],
                                  dtype=torch.long, device=device)
        self.last: dict[str, torch.Tensor] | None = None
        self.rows: list[dict] = []

    def set_probe_batch(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                        loss_fn: Callable, param_names: Sequence[str]) -> None:
        """The model, its training loss ``loss_fn(outputs, y)``, the names of the layers'
        parameters (layer order) and the fixed, already normalised batch the probes use (the
        minibatch secant ``eps_over_lr`` always, the curvature probe when it is on)."""
        self.probe = (model, x, y, loss_fn, list(param_names))

    def record_step(self, step: int, stats: Mapping[str, torch.Tensor],
                    updates: Sequence[torch.Tensor] | None = None) -> None:
        """Keep the statistics of the last step before an evaluation (device tensors, no sync).

        ``updates``: the loop's buffer holding ``−u(t)`` per parameter (layer order): used for
        ``eps_over_lr`` (while ``p.grad`` still holds this step's gradient) and kept for the
        curvature probe when it is on."""
        self.last = {k: stats[k].detach().clone()
                     for k in ("grad_norm", "update_norm", "weight_norm", "scales", "global_lr")}
        self.last["step"] = step
        if updates is not None and self.probe is not None:
            self.last["secant_l1_minibatch"] = self.minibatch_secant(updates)
        if self.curvature_every and updates is not None:
            self.last["update"] = [torch.neg(d.detach()) for d in updates]

    def minibatch_secant(self, updates: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[L]`` ``Σ|Δg_l| / Σ|u_l|`` between this step's gradient (``p.grad``, batch B_t, at
        θ(t)) and the gradient on the probe batch at θ(t+1) (the live weights), ``updates``
        holding ``±u``: the inverse of the plain minibatch L1 secant ε. On the device, no sync."""
        model, x, y, train_loss, names = self.probe
        params = [p for layer in self.layers for p in layer.params]
        live = [p.detach().requires_grad_(True) for p in params]
        buffers = {n: b.clone() for n, b in model.named_buffers()}  # BatchNorm stats untouched
        with torch.enable_grad():
            out = torch.func.functional_call(model, (dict(zip(names, live)), buffers), (x.float(),))
            after = torch.autograd.grad(train_loss(out, y), live, allow_unused=True)
        diff, step = [], []
        for p, g, d in zip(params, after, updates):
            g = torch.zeros_like(p) if g is None else g
            diff.append((g - (p.grad if p.grad is not None else 0)).abs().sum())
            step.append(d.abs().sum())
        total = torch.zeros(2, len(self.layers), device=self.device)
        total[0].index_add_(0, self.owner, torch.stack(diff).float())
        total[1].index_add_(0, self.owner, torch.stack(step).float())
        return total[0] / total[1]

    def curvature_columns(self) -> dict[str, torch.Tensor]:
        """The curvature probe at the current weights along the last recorded update."""
        model, x, y, train_loss, names = self.probe
        probe_model = copy.deepcopy(model)
        torch.func.replace_all_batch_norm_modules_(probe_model)
        probe_model.train()

        def loss_fn(params):
            return train_loss(torch.func.functional_call(probe_model, dict(zip(names, params)), (x.float(),)), y)

        params = [[p.detach().float() for p in layer.params] for layer in self.layers]
        updates, i = [], 0
        for layer in self.layers:
            updates.append([u.float() for u in self.last["update"][i:i + len(layer.params)]])
            i += len(layer.params)
        return layer_curvatures(loss_fn, params, updates)

    @torch.no_grad()
    def layer_rotation(self) -> torch.Tensor:
        """``[L]`` cosine distance of each layer's kernels to their initial values."""
        out = torch.zeros(len(self.layers), device=self.device)
        for i, (layer, start) in enumerate(zip(self.layers, self.initial)):
            now = kernels(layer)
            dot = sum((a.float() * b.float()).sum() for a, b in zip(now, start))
            norm_now = torch.sqrt(sum(a.float().pow(2).sum() for a in now))
            norm_start = torch.sqrt(sum(b.float().pow(2).sum() for b in start))
            out[i] = 1 - dot / (norm_now * norm_start).clamp_min(1e-30)
        return out

    def at_evaluation(self, epoch: int, step: int) -> list[dict]:
        """Per-layer rows for this evaluation (host values: called at log points only)."""
        columns = {}
        if self.rotation:
            columns["rotation"] = self.layer_rotation()
        if self.last is not None:
            columns["weight_norm"] = self.last["weight_norm"]
            columns["grad_norm"] = self.last["grad_norm"]
            columns["update_ratio"] = self.last["update_norm"] / self.last["weight_norm"].clamp_min(1e-30)
            columns["effective_lr"] = self.last["scales"] * self.last["global_lr"]
            if "secant_l1_minibatch" in self.last:  # ε/η = 1 / (η · Σ|Δg|/Σ|u|)
                columns["eps_over_lr"] = 1 / (columns["effective_lr"] * self.last["secant_l1_minibatch"])
            if (self.curvature_every and self.probe is not None and "update" in self.last
                    and epoch % self.curvature_every == 0):
                columns.update(self.curvature_columns())
                columns["lr_x_curvature"] = columns["effective_lr"] * columns["curvature"]
                columns["eps_over_lr_same_batch"] = 1 / (columns["effective_lr"] * columns["secant_l1"])
        host = {k: v.float().cpu().tolist() for k, v in columns.items()}
        rows = []
        for i, layer in enumerate(self.layers):
            row = {"epoch": epoch, "step": step, "layer": i, "name": layer.name}
            row.update({k: values[i] for k, values in host.items()})
            rows.append(row)
        self.rows.extend(rows)
        return rows

    def csv(self) -> str:
        return rows_csv(self.rows, default_header=("epoch", "step", "layer", "name"))

    def summary(self) -> dict:
        last_step = self.rows[-1]["step"] if self.rows else None
        return {row["name"]: {k: v for k, v in row.items() if k not in ("epoch", "step", "layer", "name")}
                for row in self.rows if row["step"] == last_step}

    def state_dict(self) -> dict:
        return {"initial": self.initial, "last": self.last, "rows": list(self.rows)}

    def load_state_dict(self, state: Mapping) -> None:
        self.initial = state["initial"]
        self.last = state["last"]
        self.rows = list(state["rows"])


def layer_curvatures(loss_fn: Callable[[list[torch.Tensor]], torch.Tensor],
                     params: Sequence[Sequence[torch.Tensor]],
                     updates: Sequence[Sequence[torch.Tensor]], chunk_size: int = 8) -> dict[str, torch.Tensor]:
    """Per layer l, along its update ``u_l`` (``params[l]``, ``updates[l]``: its tensors):

    * ``curvature`` ``u_lᵀ H_ll u_l / ‖u_l‖²``: exact, ``torch.func.jvp`` of ``torch.func.grad``
      with the tangent ``u_l`` on layer l and 0 elsewhere (one per layer, batched with
      ``vmap`` in chunks of ``chunk_size`` layers);
    * ``curvature_full`` ``u_lᵀ (H u)_l / ‖u_l‖²``: the same with every layer moving by its
      update, so the cross-layer blocks ``H_lm u_m`` count: what a secant over a training step
      sees in the small-step limit;
    * ``secant_curvature`` ``(g_l(θ) − g_l(θ−u))·u_l / ‖u_l‖²`` and ``secant_l1``
      ``Σ|g_l(θ) − g_l(θ−u)| / Σ|u_l|``: finite differences over the whole step.

    ``loss_fn`` maps the flat parameter list (layer order) to a 0-d loss. NaN where ``u_l = 0``.
    """
    flat = [p.detach() for layer in params for p in layer]
    flat_updates = [u.detach() for layer in updates for u in layer]
    owner = [l for l, layer in enumerate(params) for _ in layer]
    count = len(params)
    # Tangent k < count: layer k's update alone; tangent count: the whole update.
    tangents = [torch.stack([u if owner[i] == k else torch.zeros_like(u) for k in range(count)] + [u])
                for i, u in enumerate(flat_updates)]
    grad_fn = torch.func.grad(loss_fn)
    hvps = torch.func.vmap(lambda t: torch.func.jvp(grad_fn, (flat,), (t,))[1], chunk_size=chunk_size)(tangents)
    grad_now = grad_fn(flat)
    grad_before = grad_fn([p - u for p, u in zip(flat, flat_updates)])

    def per_layer(values: list[torch.Tensor]) -> torch.Tensor:
        out = torch.zeros(count, dtype=torch.float64, device=values[0].device)
        return out.index_add_(0, torch.tensor(owner, device=out.device), torch.stack(values).double())

    own = [torch.stack([hvps[i][owner[i]], hvps[i][count]]) for i in range(len(flat))]
    uu = per_layer([(u * u).sum() for u in flat_updates])
    diff = [a - b for a, b in zip(grad_now, grad_before)]
    columns = {
        "curvature": per_layer([(h[0] * u).sum() for h, u in zip(own, flat_updates)]) / uu,
        "curvature_full": per_layer([(h[1] * u).sum() for h, u in zip(own, flat_updates)]) / uu,
        "secant_curvature": per_layer([(d * u).sum() for d, u in zip(diff, flat_updates)]) / uu,
        "secant_l1": per_layer([d.abs().sum() for d in diff]) / per_layer([u.abs().sum() for u in flat_updates]),
    }
    return {k: v.float().nan_to_num(nan=math.nan, posinf=math.nan, neginf=math.nan) for k, v in columns.items()}
