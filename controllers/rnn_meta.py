"""``rnn_meta``: a small recurrent meta-learner that outputs one LR scale per layer.

Every ``every`` steps a GRU cell (Cho et al. 2014, arXiv 1406.1078), with weights shared
across layers, reads one feature vector per layer and writes that layer's log-scale::

    x_l(t)  = normalise([log‖g_l‖, log‖θ_l‖, log(‖u_l‖/‖θ_l‖), cos(g_l(t), −u_l(t−1)),
                         rotation_l, depth_l, progress, log L(t) − log L̄])
    h_l(t)  = GRU([x_l(t), mean_k h_k(t−1)], h_l(t−1))      (the mean: the optional mixing step)
    log s_l = log b_l + c + r·tanh(w·h_l(t) + a)             c ± r = log max_scale, log min_scale

``b_l`` is the baseline (1, a constant per layer, or a replayed curve: a
``meta_llr.export`` JSON or a run's ``llr.csv``). The
output bias ``a`` starts where ``s_l = b_l``. Scale-dependent features (the logs and the
loss change) are standardised by running means and variances over layers and time, as
learned optimizers do (Andrychowicz et al. 2016, arXiv 1606.04474; Metz et al. 2020,
arXiv 2009.11243). ``cos(g_l(t), −u_l(t−1))`` is the cosine between this gradient and the
previous update's direction: exactly the previous gradient's for SGD without momentum or
decay, the momentum buffer's otherwise; it costs no copy of the gradient. Layer rotation is
``1 − cos(w_l(t), w_l(0))`` over the layer's kernels taken together (Carbonnelle & De
Vleeschouwer, arXiv 1806.01603) and needs one half-precision copy of the initial kernels, each
layer's scaled to unit norm (≤ 0.5× the parameter bytes).

How the learner learns (``learn=``):

* ``online`` (default): the one-step hypergradient (Baydin et al. 2018, arXiv 1703.04782).
  With ``θ(t+1) = θ(t) + u(t)`` and ``u_l ∝ s_l`` (plain SGD), ``∂θ_l(t+1)/∂log s_l(t) = u_l(t)``,
  so ``∂L(t+1)/∂log s_l(t) = g_l(t+1)·u_l(t) = −η_l·g_l(t+1)·g_l(t)``: the loop's
  ``grad_dot_prev_update``. With momentum or Adam it is the standard approximation (it
  ignores the scale's effect on later updates through the momentum buffer). These
  per-layer signals, each divided by its running RMS (a positive diagonal preconditioner),
  are back-propagated into the GRU through its outputs by truncated BPTT over ``horizon``
  outputs (the window is replayed from its stored inputs with the current weights, then one
  step of the learner's own Adam, ``meta_lr``). One-step signals are biased towards too
  small LRs (short-horizon bias, Wu et al. 2018, arXiv 1803.02021); ``unrolled`` and
  meta-training (``python -m meta_llr.metatrain``) are the remedies.
* ``unrolled``: the signal is ``∂L_val(θ_k)/∂log s`` after a ``unroll``-step SGD lookahead
  from the current weights on training batches, ``L_val`` on a held-out batch, computed with
  ``torch.func`` every ``meta_every`` steps (:func:`meta_llr.lookahead.unrolled_hypergradient`;
  cost per step ≈ (3·unroll + 1)/meta_every training steps). The loop hands over its model,
  loss and a batch sampler through the plan (``Plan.sample_batches``; the held-out batch comes
  from the validation split, so it needs ``data.val_size=N``); ``attach_lookahead(...)`` sets
  other ones from Python.
* ``off``: frozen weights from ``weights=PATH`` (written by ``meta_llr.metatrain`` or
  :meth:`RNNMeta.save_weights`); ``weights=null`` keeps the seeded initial weights.
  Evolution strategies over whole runs (``meta_llr.metatrain``) have no truncation bias
  (Metz et al. 2019, arXiv 1810.10180).

Cost, in kernel ops (``python -m meta_llr.bench``; the same for every depth): 37 per firing beyond
the loop's statistics (the features with one segmented sum for the rotation, the standardisation
as one ``native_batch_norm``, the GRU as one ``addmm`` and four element-wise ops, the head, the
scales), and with ``learn=online`` a meta step every ``horizon`` firings (the window replayed
with autograd, one Adam step: ≈ 205 ops more); no host sync. The learner has ≈ 2k parameters with
``hidden=16``.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from meta_llr.errors import UserError
from meta_llr.interface import Controller, Lookahead
from meta_llr.registry import register
from meta_llr.per_layer import PerLayer

NUM_FEATURES = 8
NORMALISED = [0, 1, 2, 7]      # features standardised by running statistics
WEIGHTS_FORMAT = "meta_llr.rnn_meta/1"
EPS = 1e-12


def _kernels(layer) -> list[torch.Tensor]:
    return [p for p in layer.params if p.dim() > 1] or list(layer.params)


class Learner(nn.Module):
    """The shared-weight GRU cell and its bounded output head.

    The cell's parameters are ``torch.nn.GRUCell``'s (the weights files keep its names); the step
    computes the same gates from one matrix ``[4H, I + H]`` (:meth:`gate_weights`): the input and
    hidden parts of ``r, z`` summed by one product, ``W_in·x`` and ``W_hn·h`` side by side, so a
    firing is one ``addmm``, not two and their sum::

        [r_pre, z_pre, n_x, n_h] = [x, h] · Wᵀ + b,   r, z = σ(r_pre), σ(z_pre)
        h' = lerp(tanh(n_x + r ⊙ n_h), h, z)           ((1 − z) ⊙ n + z ⊙ h, Cho et al. 2014)
    """

    def __init__(self, hidden: int, mix: bool, seed: int, min_scale: float, max_scale: float):
        super().__init__()
        self.mix = mix
        with torch.random.fork_rng(devices=[]):   # never touch the run's global RNG
            torch.manual_seed(seed)
            self.cell = nn.GRUCell(NUM_FEATURES + (hidden if mix else 0), hidden)
            self.head = nn.Linear(hidden, 1)
            nn.init.normal_(self.head.weight, std=0.1 / math.sqrt(hidden))
        lo, hi = math.log(min_scale), math.log(max_scale)
        self.center, self.radius = (hi + lo) / 2, (hi - lo) / 2
        with torch.no_grad():  # tanh(a) = -c/r: the output starts at log s = log b
            self.head.bias.fill_(math.atanh(-self.center / self.radius))

    def gate_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The cell's parameters as one gate matrix ``[4H, I + H]`` and bias ``[4H]`` (rows
        ``r, z, n_x, n_h``; differentiable)."""
        cell, H = self.cell, self.cell.hidden_size
        w_x, w_h, b_x, b_h = cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh
        weight = torch.cat([torch.cat([w_x[:2 * H], w_h[:2 * H]], 1),
                            F.pad(w_x[2 * H:], (0, H)), F.pad(w_h[2 * H:], (w_x.shape[1], 0))])
        return weight, torch.cat([b_x[:2 * H] + b_h[:2 * H], b_x[2 * H:], b_h[2 * H:]])

    def forward(self, x: torch.Tensor, h: torch.Tensor, gates: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [L, F]``, ``h [L, H]``, ``gates`` from :meth:`gate_weights` -> (``tanh`` of the
        head ``[L]``, new hidden ``[L, H]``); the log-scale offset is ``center + radius·tanh``."""
        H = h.shape[1]
        inputs = [x, h.mean(0, keepdim=True).expand(h.shape[0], -1), h] if self.mix else [x, h]
        pre = torch.addmm(gates[1], torch.cat(inputs, 1), gates[0].t())
        rz = pre[:, :2 * H].sigmoid()
        n = torch.addcmul(pre[:, 2 * H:3 * H], rz[:, :H], pre[:, 3 * H:]).tanh()
        h = torch.lerp(n, h, rz[:, H:])
        return self.head(h).squeeze(1).tanh(), h


@register("rnn_meta")
class RNNMeta(Controller):
    """A GRU meta-learner producing per-layer log-scales; learns online, unrolled, or is frozen."""

    needs = frozenset({"grad_norm", "weight_norm", "update_norm", "grad_dot_prev_update"})

    def __init__(self, learn: str = "online", weights: str | None = None, hidden: int = 16,
                 mix: bool = True, min_scale: float = 0.1, max_scale: float = 10.0,
                 every: int = 1, horizon: int = 4, meta_lr: float = 0.01,
                 unroll: int = 3, meta_every: int = 10, feature_decay: float = 0.99,
                 baseline: list[float] | None = None, baseline_curve: str | None = None,
                 seed: int = 0):
        if learn not in ("online", "unrolled", "off"):
            raise ValueError(f"learn must be online, unrolled or off, got {learn!r}")
        if not 0 < min_scale < 1 < max_scale:
            raise ValueError(f"need 0 < min_scale < 1 < max_scale, got {min_scale}, {max_scale}")
        for key, value in (("hidden", hidden), ("every", every), ("horizon", horizon),
                           ("unroll", unroll), ("meta_every", meta_every)):
            if value < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")
        if meta_lr < 0 or not 0 < feature_decay < 1:
            raise ValueError("meta_lr must be >= 0 and feature_decay in (0, 1)")
        if baseline is not None and any(b <= 0 for b in baseline):
            raise ValueError(f"baseline scales must be > 0, got {baseline}")
        if baseline is not None and baseline_curve is not None:
            raise ValueError("give baseline or baseline_curve, not both")
        if baseline_curve is not None and not Path(baseline_curve).is_file():
            raise ValueError(f"baseline_curve={baseline_curve} does not exist; pass a run's llr.csv "
                             "or a curve.json from python -m meta_llr.export")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.learn, self.weights_path, self.hidden, self.mix = learn, weights, hidden, mix
        self.every, self.horizon, self.meta_lr = every, horizon, meta_lr
        self.unroll, self.meta_every, self.decay = unroll, meta_every, feature_decay
        self.baseline, self.baseline_curve = baseline, baseline_curve
        self.learner = Learner(hidden, mix, seed, min_scale, max_scale)
        if weights is not None:
            self.load_weights(weights)
        self.lookahead = None

    # ------------------------------------------------------------------ weights
    def weights_dict(self) -> dict:
        return {"format": WEIGHTS_FORMAT, "hidden": self.hidden, "mix": self.mix,
                "center": self.learner.center, "radius": self.learner.radius,
                "params": {k: v.detach().cpu().clone() for k, v in self.learner.state_dict().items()}}

    def save_weights(self, path: str | Path) -> None:
        from meta_llr.records import save_atomic
        save_atomic(self.weights_dict(), path)

    def load_weights(self, source: str | Path | dict) -> None:
        """Load a weights file (or its dict) from :meth:`save_weights` / ``meta_llr.metatrain``; anything
        else (a missing, unreadable or foreign file, other keys, shapes, hidden/mix, non-finite
        values) is one UserError line naming the file and what is expected."""
        where = "controller.weights" if isinstance(source, dict) else f"controller.weights={source}"
        expected = (f"pass a weights.pt written by python -m meta_llr.metatrain or save_weights "
                    f"(format {WEIGHTS_FORMAT}, hidden={self.hidden}, mix={self.mix})")
        if not isinstance(source, dict):
            path = Path(source)
            if not path.is_file():
                raise UserError(f"{where} does not exist; pass the weights.pt written by python -m meta_llr.metatrain")
            try:
                source = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as error:
                raise UserError(f"{where} is not a torch file (torch.load: {type(error).__name__}); {expected}") from None
        if not isinstance(source, dict) or source.get("format") != WEIGHTS_FORMAT \
                or not isinstance(source.get("hidden"), int) or not isinstance(source.get("mix"), bool):
            raise UserError(f"{where} is not an rnn_meta weights file; {expected}")
        if (source["hidden"], source["mix"]) != (self.hidden, self.mix):
            raise UserError(f"{where} has hidden={source['hidden']} mix={source['mix']}; "
                            f"pass controller.hidden={source['hidden']} controller.mix={source['mix']}")
        params, own = source.get("params"), self.learner.state_dict()
        if not isinstance(params, dict) or set(params) != set(own) or any(
                not isinstance(params[k], torch.Tensor) or params[k].shape != v.shape for k, v in own.items()):
            shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in own.items())
            raise UserError(f"{where} holds parameters of other names or shapes than {shapes}; {expected}")
        if not all(bool(params[k].isfinite().all()) for k in own):
            raise UserError(f"{where} holds non-finite parameters; {expected}")
        with torch.no_grad():
            for name, p in own.items():
                p.copy_(params[name])
        self.refresh()

    def flat(self) -> torch.Tensor:
        """All learner parameters as one 1-D float32 CPU tensor (for evolution strategies)."""
        return torch.cat([p.detach().float().cpu().reshape(-1) for p in self.learner.parameters()])

    def load_flat(self, vector: torch.Tensor) -> None:
        with torch.no_grad():
            i = 0
            for p in self.learner.parameters():
                p.copy_(vector[i:i + p.numel()].view_as(p))
                i += p.numel()
        self.refresh()

    # ------------------------------------------------------------------ setup
    def setup(self, layers, plan):
        super().setup(layers, plan)
        device, L, H = plan.device, self.num_layers, self.hidden
        if self.learn == "unrolled":
            if self.lookahead is None and plan.lookahead is not None:
                self.attach_lookahead(plan.lookahead)
            if plan.optimizer.name != "sgd":
                raise UserError("controller.learn=unrolled looks ahead through SGD steps; use trainer.optimizer=sgd")
        self.learner.to(device)
        self.params = list(self.learner.parameters())
        self.refresh()
        self.log_base = self._baseline_table(device) + self.learner.center   # [rows, L]: log b_l + c
        self.depth_dev = self.depths.to(device)
        steps = plan.total_steps
        self.progress = (torch.arange(steps, dtype=torch.float64) / steps).float().to(device)
        # Rotation: the initial kernels, each layer's scaled to unit norm, flat, in half precision
        # (a feature, not a measurement): with the loop's update buffer the extra state stays
        # within 2x the parameters. The run keeps the kernels back to back (parameter_order), so
        # they are read as one vector with no copy.
        self.kernels = [k for layer in layers for k in _kernels(layer)]
        layer_of = [layer.index for layer in layers for _ in _kernels(layer)]
        self.per_layer = PerLayer(self.kernels, layer_of, L, device)
        norm0 = self.per_layer.norm([k.detach().float() for k in self.kernels]).clamp_min(EPS)
        self.initial = self.per_layer.flat([k.detach() / norm0[i] for k, i in zip(self.kernels, layer_of)]
                                           ).to(torch.float16)
        # The standardisation as one affine map (native_batch_norm with the running moments):
        # columns not standardised keep mean 0 and variance 1, and the map writes cos(g, −u) and
        # 1 − cos(w, w0) from the raw quotients (weight −1; bias 1 on the rotation).
        normalised = torch.zeros(NUM_FEATURES, device=device)
        normalised[NORMALISED] = 1.0
        self.moment_mask = normalised.repeat(2)                 # [mean_F, mean_sq_F]
        self.affine_weight = torch.ones(NUM_FEATURES, device=device)
        self.affine_weight[[3, 4]] = -1.0
        self.affine_bias = torch.zeros(NUM_FEATURES, device=device)
        self.affine_bias[4] = 1.0
        self.moment_weights, self.moments_settled = self._moment_weights(device)
        zeros = lambda *shape: torch.zeros(*shape, device=device)
        self.hidden_state = zeros(L, H)
        slots = 2 * self.horizon                             # double-buffered BPTT windows
        self.window_x = zeros(slots, L, NUM_FEATURES)
        self.window_signal = zeros(slots, L)
        self.window_start = zeros(2, L, H)
        self.signal_sq = zeros(L)                            # running mean of signal² per layer
        # bias-corrected running means over layers and time of x and x² (standardised columns)
        self.feature_moments = torch.cat([zeros(NUM_FEATURES), torch.ones(NUM_FEATURES, device=device)])
        self.prev_update_norm = torch.full((L,), EPS, device=device)   # ‖u(t−1)‖, clamped
        self.log_loss_avg = zeros(())
        self.adam_m = [torch.zeros_like(p) for p in self.params]
        self.adam_v = [torch.zeros_like(p) for p in self.params]
        self.meta_steps = 0
        with torch.no_grad():                                # output from zero features
            self.squashed, self.hidden_state = self.learner(self.window_x[0], self.hidden_state, self.gates)
        self.current = zeros(L)
        self._set_scales(0)

    def refresh(self) -> None:
        """Rebuild the gate matrix from the learner's parameters: after they change (a meta step,
        loaded weights); changing them otherwise takes effect at the next call."""
        with torch.no_grad():
            self.gates = self.learner.gate_weights()

    def _moment_weights(self, device) -> tuple[torch.Tensor, bool]:
        """Row ``f``: the weight of firing ``f``'s moments in their bias-corrected running mean,
        ``(1 − d) / (1 − dᶠ)`` (``m̂_f = lerp(m̂_{f−1}, x_f, ·)`` equals ``m_f / (1 − dᶠ)``), 0 on the
        columns not standardised; kept until ``dᶠ`` is below float32 resolution (at most 65,536
        rows). Also whether the last row holds for every later firing (``dᶠ`` settled)."""
        settled = math.ceil(math.log(2.0 ** -25) / math.log(self.decay))
        rows = min(settled, self.plan.total_steps // self.every + 1, 65536)
        fires = torch.arange(rows + 1, dtype=torch.float64).clamp_min(1)
        weight = (1 - self.decay) / (1 - self.decay ** fires)
        return weight.unsqueeze(1).float().to(device) * self.moment_mask, rows == settled

    def _baseline_table(self, device) -> torch.Tensor:
        L = self.num_layers
        if self.baseline_curve is not None:
            return self._read_curve(Path(self.baseline_curve), device)
        base = [1.0] * L if self.baseline is None else list(self.baseline)
        if len(base) == 1:
            base = base * L
        if len(base) != L:
            raise UserError(f"controller.baseline has {len(base)} values but the model has {L} layers; "
                            f"give {L} values or one")
        return torch.tensor(base, dtype=torch.float32, device=device).log().unsqueeze(0)

    def _read_curve(self, path: Path, device) -> torch.Tensor:
        """A curve resampled to ``[steps, L]`` log-scales: a ``meta_llr.export`` JSON
        (piecewise linear in progress) or a run's ``llr.csv`` (piecewise constant, like the trace)."""
        if path.suffix == ".json":
            from meta_llr.curves import load_curve
            layers = load_curve(path)["layers"]
            if len(layers) != self.num_layers:
                raise UserError(f"controller.baseline_curve={path} has {len(layers)} layers, the model "
                                f"{self.num_layers}; export a run of the same model")
            steps = np.arange(self.plan.total_steps) / self.plan.total_steps
            table = np.stack([np.interp(steps, layer["knots"], layer["values"]) for layer in layers], axis=1)
            return torch.tensor(table, dtype=torch.float64).clamp_min(1e-8).log().float().to(device)
        if not path.is_file():
            raise UserError(f"controller.baseline_curve={path} does not exist; pass a run's llr.csv "
                            "or a curve.json from python -m meta_llr.export")
        try:
            with path.open() as f:
                rows = list(csv.reader(f))
        except (OSError, UnicodeDecodeError, csv.Error) as error:
            raise UserError(f"controller.baseline_curve={path} is not a readable CSV ({error}); pass a run's llr.csv") from None
        header, body = (rows[0], rows[1:]) if rows else ([], [])
        if "progress" not in header or len(header) - 3 != self.num_layers or not body:
            raise UserError(f"controller.baseline_curve={path} needs columns step,progress,global_lr and "
                            f"{self.num_layers} layer columns")
        try:
            table = torch.tensor([[float(v) for v in row] for row in body], dtype=torch.float64)
        except ValueError:  # a non-number or a short row
            table = None
        if table is None or table.shape[1] != len(header) or not bool(table.isfinite().all()):
            raise UserError(f"controller.baseline_curve={path} has rows that are not {len(header)} finite numbers; "
                            "pass a run's llr.csv as the run wrote it")
        progress, scales = table[:, 1].contiguous(), table[:, 3:].clamp_min(1e-8)
        steps = torch.arange(self.plan.total_steps, dtype=torch.float64) / self.plan.total_steps
        index = torch.searchsorted(progress, steps, right=True).sub(1).clamp(0, len(progress) - 1)
        return scales[index].log().float().to(device)        # piecewise constant, like the trace

    def _set_scales(self, step: int) -> None:
        """``s = exp(log b + c + r·tanh(·))``, written into the tensor ``scales`` returns."""
        base = self.log_base[min(step, len(self.log_base) - 1)]
        torch.add(base, self.squashed, alpha=self.learner.radius, out=self.current).exp_()

    def scales(self, step: int) -> torch.Tensor:
        if len(self.log_base) > 1 and step % self.every != 0:   # a replayed baseline moves every step
            self._set_scales(step)
        return self.current

    # ------------------------------------------------------------------ observe
    @torch.no_grad()
    def observe(self, step, stats):
        every, k = self.every, self.horizon
        if self.learn == "unrolled" and (self.lookahead is None or not self.lookahead.held_out):
            # at the first step, not at setup: attach_lookahead may follow setup
            raise UserError("controller.learn=unrolled needs held-out batches: run it in the training loop with "
                            "data.val_size=N, or call controller.attach_lookahead(Lookahead(...))")
        # 1) the signal for the output used at step-1 (online: ∂L(t)/∂log s(t−1)).
        if step >= 1 and self.learn == "online":
            slot = ((step - 1) // every) % (2 * k)
            if (step - 1) % every == 0:                         # the output's first signal
                self.window_signal[slot].copy_(stats["grad_dot_prev_update"])
            else:
                self.window_signal[slot].add_(stats["grad_dot_prev_update"])
        # 2) a window of `horizon` outputs with complete signals: one meta step.
        if self.learn != "off" and step % every == 0 and step >= every:
            done = step // every - 1                            # this output's signal is complete
            if (done + 1) % k == 0:
                self._meta_step(done + 1 - k)
        fire = (step + 1) % every == 0
        n = (step + 1) // every                                 # the next output, used from step + 1 on
        slot = n % (2 * k)
        if fire:
            log_loss = self._features(step, stats, out=self.window_x[slot])
        else:
            log_loss = stats["loss"].float().clamp_min(EPS).log()
            if step == 0:
                self.log_loss_avg.copy_(log_loss)
            self.prev_update_norm = stats["update_norm"].clamp_min(EPS)
        self.log_loss_avg.lerp_(log_loss, 0.1)
        if not fire:
            return
        # 3) the next output
        if n % k == 0:
            self.window_start[(n // k) % 2].copy_(self.hidden_state)
        if self.learn == "unrolled":
            self.window_signal[slot].zero_()
        self.squashed, self.hidden_state = self.learner(self.window_x[slot], self.hidden_state, self.gates)
        self._set_scales(step + 1)
        if self.learn == "unrolled" and (step + 1) % self.meta_every == 0:
            self.window_signal[slot].copy_(self._unrolled_signal(step + 1))

    def _features(self, step, stats, out: torch.Tensor) -> torch.Tensor:
        """Writes this firing's standardised features ``[L, F]`` into ``out``; returns ``log L(t)``."""
        L = self.num_layers
        theta = self.per_layer.flat_view(self.kernels)
        rows = torch.stack([self.initial, theta]).mul_(theta)             # [ŵ0·w, w·w]
        dot, kernel_sq = self.per_layer.totals_of_flat(rows).unbind()   # per layer, over its kernels
        clamped = torch.stack([stats["grad_norm"], stats["weight_norm"], stats["update_norm"],
                               stats["loss"].float().expand(L), kernel_sq]).clamp_min_(EPS)
        logs = clamped.log()
        if step == 0:
            self.log_loss_avg.copy_(logs[3, 0])
        x = torch.stack([
            logs[0],
            logs[1],
            logs[2] - logs[1],
            stats["grad_dot_prev_update"] / (clamped[0] * self.prev_update_norm),  # −cos(g, −u(t−1))
            dot * clamped[4].rsqrt(),                                              # cos(w, w0)
            self.depth_dev,
            self.progress[step].expand(L),
            logs[3] - self.log_loss_avg,
        ], dim=1)
        # A diverging run: inf -> ±1e4 (finite features are bounded: logs of clamped norms, cosines).
        x = torch.nan_to_num(x, nan=0.0, posinf=1e4, neginf=-1e4)
        self.prev_update_norm = clamped[2]
        fires = step // self.every + 1
        if fires < len(self.moment_weights) or self.moments_settled:
            weight = self.moment_weights[min(fires, len(self.moment_weights) - 1)]
        else:
            weight = self.moment_mask * ((1 - self.decay) / (1 - self.decay ** fires))
        self.feature_moments.lerp_(torch.cat([x, x * x], 1).mean(0), weight)
        mean, mean_sq = self.feature_moments.view(2, NUM_FEATURES)
        var = torch.addcmul(mean_sq, mean, mean, value=-1).clamp_min_(1e-8)
        z = torch.native_batch_norm(x, self.affine_weight, self.affine_bias, mean, var, False, 0.0, 0.0)[0]
        torch.clamp(z, -5, 5, out=out)
        return logs[3, 0]

    def _meta_step(self, first: int) -> None:
        """Replay outputs ``first .. first+horizon-1`` with the current weights; one Adam step."""
        k = self.horizon
        window = slice(first % (2 * k), first % (2 * k) + k)   # first is a multiple of k: contiguous
        signal = torch.nan_to_num(self.window_signal[window], nan=0.0, posinf=0.0, neginf=0.0)  # [k, L]
        inputs = self.window_x[window]
        self.signal_sq.lerp_((signal * signal).mean(0), 0.1)
        self.meta_steps += 1
        rms = (self.signal_sq / (1 - 0.9 ** self.meta_steps)).sqrt()
        signal = signal * (self.learner.radius / (rms + 1e-30))   # ∂ offset / ∂ tanh = radius
        h = self.window_start[(first // k) % 2]
        with torch.enable_grad():  # differentiated w.r.t. the gate matrix, then split into the cell's
            weight, bias = (t.detach().requires_grad_() for t in self.gates)
            outputs = []
            for j in range(k):
                squashed, h = self.learner(inputs[j], h, (weight, bias))
                outputs.append(squashed)
            surrogate = (signal * torch.stack(outputs)).sum()
            d_weight, d_bias, *d_head = torch.autograd.grad(surrogate, [weight, bias, *self.learner.head.parameters()])
        H = self.hidden
        I = d_weight.shape[1] - H
        self._adam([torch.cat([d_weight[:2 * H, :I], d_weight[2 * H:3 * H, :I]]),   # weight_ih
                    torch.cat([d_weight[:2 * H, I:], d_weight[3 * H:, I:]]),        # weight_hh
                    torch.cat([d_bias[:2 * H], d_bias[2 * H:3 * H]]),               # bias_ih
                    torch.cat([d_bias[:2 * H], d_bias[3 * H:]]),                    # bias_hh
                    *d_head])
        self.refresh()

    @torch.no_grad()
    def _adam(self, grads, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> None:
        """One Adam step (Kingma & Ba 2015) on the learner's weights, op for op the non-capturable
        path of ``torch.optim.Adam(foreach=True)`` (``torch/optim/adam.py``, ``_multi_tensor_adam``;
        it takes ``bc ** 0.5`` where this takes ``math.sqrt(bc)``; on the reference run both give
        the same bits). Not torch's class itself: that path reads
        every parameter's step-count tensor with ``.item()`` (``_get_value``), twice per step, which
        the controller contract forbids inside a step (and which syncs on CUDA once a resumed
        checkpoint has put the counts there); ``capturable=True`` avoids it but does not run on
        CPU, and ``fused=True`` changes the bits. Here the count is the Python int ``meta_steps``."""
        t = self.meta_steps
        torch._foreach_lerp_(self.adam_m, grads, 1 - beta1)
        torch._foreach_mul_(self.adam_v, beta2)
        torch._foreach_addcmul_(self.adam_v, grads, grads, 1 - beta2)
        denom = torch._foreach_sqrt(self.adam_v)
        torch._foreach_div_(denom, math.sqrt(1 - beta2 ** t))
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(self.params, self.adam_m, denom, -self.meta_lr / (1 - beta1 ** t))

    # ------------------------------------------------------------------ unrolled
    def attach_lookahead(self, lookahead: Lookahead) -> None:
        """Enable ``learn=unrolled`` outside the loop: ``lookahead.sample_batches(k)`` returns
        (k train batches, a held-out batch); ``lookahead.model`` is the trained module (its
        parameters are the layers' parameters). Each signal uses ``unroll`` train batches."""
        self.lookahead = lookahead

    def _unrolled_signal(self, step: int) -> torch.Tensor:
        from meta_llr.lookahead import unrolled_hypergradient
        model, loss_fn = self.lookahead.model, self.lookahead.loss_fn
        train_batches, held_out = self.lookahead.sample_batches(self.unroll)
        layer_of = {id(p): layer.index for layer in self.layers for p in layer.params}
        log_scales = self.current.log()
        lr = self.plan.global_lr(step)
        spec, optimizer = self.plan.optimizer, self.lookahead.optimizer
        params = [p for layer in self.layers for p in layer.params]
        decay = {id(p): spec.weight_decay if (p.dim() > 1 or spec.decay_1d) else 0.0 for p in params}
        buffers = {}
        if optimizer is not None:  # the run's momentum buffers: the lookahead continues its optimizer
            buffers = {id(p): optimizer.state[p]["momentum_buffer"] for p in params
                       if optimizer.state.get(p, {}).get("momentum_buffer") is not None}
        scaled = None if self.scale_1d else {id(p) for p in params if p.dim() > 1}
        with torch.enable_grad():
            _, grad = unrolled_hypergradient(model, loss_fn, log_scales, layer_of, train_batches[:self.unroll],
                                             held_out, lr, momentum=spec.momentum, nesterov=spec.nesterov,
                                             decay_of=decay, momentum_buffers=buffers, scaled=scaled)
        return grad.detach()

    # ------------------------------------------------------------------ state
    _STATE = ("hidden_state", "window_x", "window_signal", "window_start", "signal_sq", "feature_moments",
              "prev_update_norm", "log_loss_avg", "squashed", "current")

    def state_dict(self) -> dict:
        state = {name: getattr(self, name).clone() for name in self._STATE}
        state.update(learner=self.weights_dict()["params"], adam_m=[m.clone() for m in self.adam_m],
                     adam_v=[v.clone() for v in self.adam_v], meta_steps=self.meta_steps,
                     initial=self.initial.clone())
        return state

    def load_state_dict(self, state) -> None:
        missing = [name for name in (*self._STATE, "learner", "initial") if name not in state]
        if missing or state["initial"].shape != self.initial.shape:
            raise UserError("the checkpoint's rnn_meta state is from another version of the controller "
                            f"({'missing ' + ', '.join(missing) if missing else 'other rotation state'}); "
                            "start the run over in a new directory")
        for name in self._STATE:
            getattr(self, name).copy_(state[name])
        with torch.no_grad():
            for name, p in self.learner.state_dict().items():
                p.copy_(state["learner"][name])
        self.refresh()
        torch._foreach_copy_(self.adam_m, list(state["adam_m"]))
        torch._foreach_copy_(self.adam_v, list(state["adam_v"]))
        self.initial.copy_(state["initial"])
        self.meta_steps = int(state["meta_steps"])
