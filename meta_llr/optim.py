"""The per-layer optimizer step in a fixed number of kernel launches, whatever the depth.

``layer_optimizer`` builds the ``torch.optim.SGD`` (momentum, Nesterov, weight decay) or
``torch.optim.AdamW`` that holds the run's optimizer *state* in torch's format (one param group
per layer, split by kind when 1-D parameters get another decay), so checkpoints,
``state_dict()`` and the lookahead's reading of momentum buffers are torch's.

``FlatStep`` performs the step. At construction the parameters are moved into one flat buffer
(each parameter becomes a view of it with its own strides, channels_last included) and so are
the state tensors (momentum buffers, Adam moments; the torch optimizer's state entries are views
of them). Elements are ordered kernels first, then 1-D tensors, layer by layer within each, so
that "decayed" and "scaled" are prefixes. One step, with ``s = scales`` (``[L]`` on the device),
``η = global_lr(t)`` (a host float from the precomputed schedule: no sync) and ``ℓ(e)`` the
layer of element ``e``:

    g   = cat(grads)                          # 1 op (zeros stand in for frozen layers)
    λ_e = μ_e·s[ℓ(e)]                         # 1 op: index_select with a fixed int32 index
    SGD:   g += wd_e·θ;  b = m·b + g;  g += m·b (Nesterov);  θ -= η·λ⊙g        # 4 ops
    AdamW: θ -= η·wd_e·λ⊙θ;  m = lerp(m, g, 1-β1);  v = β2·v + (1-β2)·g²;
           θ -= (η/bc1)·(λ⊙m) / (√v/√bc2 + ε)                                  # 8 ops

(the formulas of ``torch.optim.SGD`` and ``torch.optim.AdamW``; ``bc_i = 1 - β_i^k`` from the
host's step count ``k``; ``μ_e`` the element's group's ``lr_mult``, 1 except under
``trainer.norm_lr_mult``, and ``wd_e`` its group's decay, ``wd/μ_e``). That is 6 ops for SGD
with Nesterov momentum and weight decay against
the 1 op of a single fused SGD group, with 58 layers as with 3: each op is one element-wise
pass over all parameters (on a GPU one launch; ``cat`` of more than 128 tensors takes one per
128). Cost: an int32 index of one entry per parameter element (param-sized for float32
parameters), and each step a flat gradient and ``λ`` (transient, two param-sized buffers).
With an LR multiplier ``λ`` is gathered from ``[s, 0, 1, μ, μ·s]`` (2 ops more on ``[L]``)
and the decay, no longer one value on a prefix, is a param-sized constant (same op count).

Frozen layers (no gradient) are not stepped, as torch.optim skips them: while any parameter has
no gradient the step runs "masked" (the set is known on the host, so the masks are rebuilt only
when it changes): its λ is 0, its weight decay 0, its momentum factor 1 on a zero gradient (the
buffer keeps its value exactly), its Adam moments unchanged, its Adam step count not advanced
(per-element bias corrections). A masked step costs 1–6 ops more.

Guarantee: the result equals ``optimizer.step()`` of the torch optimizer with group LRs
``η·s[layer]·lr_mult`` up to float rounding (tests/test_optim.py: SGD with and without momentum,
AdamW, decay on 1-D tensors or not, 1-D tensors scaled or not, a norm LR multiplier, frozen
steps, channels_last).
The arithmetic is not torch's fused kernel's, so results are not bitwise torch's.
"""
from __future__ import annotations

import math
from collections.abc import Sequence, Set

import torch


def layer_optimizer(layers: Sequence, trainer, scale_1d: bool, norm_params: Set[int] = frozenset()
                    ) -> torch.optim.Optimizer:
    """The torch optimizer that holds the state: one group per layer (or per layer and kind:
    0 = tensors of >= 2 dims, 1 = 1-D, 2 = 1-D of normalisation layers when
    ``trainer.norm_lr_mult`` is not 1) with ``layer``, ``kind``, ``scaled`` and ``lr_mult``
    entries. ``norm_params``: the ``id``s of the normalisation layers' parameters. Kind 2's LR is
    ``norm_lr_mult`` times its layer's and its weight decay is divided by it, so the decay's pull
    per step stays (airbench's 64x "bias scaler" on BatchNorm shifts, arXiv 2404.00498)."""
    groups = []
    mult = float(getattr(trainer, "norm_lr_mult", 1.0))
    norm = norm_params if mult != 1 else frozenset()
    merge = trainer.decay_1d or trainer.weight_decay == 0
    for layer in layers:
        kernels, others = [p for p in layer.params if p.dim() > 1], [p for p in layer.params if p.dim() <= 1]
        boosted = [p for p in others if id(p) in norm]
        others = [p for p in others if id(p) not in norm]
        parts = ((0, kernels + others),) if merge and scale_1d else ((0, kernels), (1, others))
        for kind, params in parts + ((2, boosted),):
            if params:
                decay = trainer.weight_decay if kind == 0 or trainer.decay_1d else 0.0
                lr_mult = mult if kind == 2 else 1.0
                groups.append({"params": params, "weight_decay": decay / lr_mult, "layer": layer.index, "kind": kind,
                               "scaled": kind == 0 or scale_1d, "lr_mult": lr_mult})
    if trainer.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=trainer.lr, momentum=trainer.momentum,
                               nesterov=bool(trainer.nesterov and trainer.momentum > 0),
                               weight_decay=trainer.weight_decay)
    return torch.optim.AdamW(groups, lr=trainer.lr, betas=tuple(trainer.betas), weight_decay=trainer.weight_decay)


def memory_order(t: torch.Tensor) -> list[int]:
    """The dims of a dense tensor by decreasing stride: ``t.permute(order)`` is contiguous."""
    return sorted(range(t.dim()), key=lambda d: (-t.stride(d), d))


def flat_view(t: torch.Tensor) -> torch.Tensor:
    """A dense tensor's elements in memory order, as a 1-D view."""
    return t.permute(memory_order(t)).view(-1)


def shaped_like(piece: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A view of the 1-D ``piece`` with ``like``'s shape and strides (its memory order)."""
    order = memory_order(like)
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return piece.view([like.shape[d] for d in order]).permute(inverse)


def zeros_laid_out_like(tensors: Sequence[torch.Tensor], flat: torch.Tensor) -> list[torch.Tensor]:
    """Zeros shaped like ``tensors`` (views of ``flat``, the buffer :func:`flatten_` moved them
    into), as views of one new buffer at the same offsets: what reads the tensors as one
    flat vector (:meth:`meta_llr.per_layer.PerLayer.flat_view`) reads these as one too."""
    buffer = torch.zeros_like(flat)
    base = flat.storage_offset()
    return [buffer.as_strided(t.shape, t.stride(), t.storage_offset() - base) for t in tensors]


def parameter_order(layers: Sequence) -> list[torch.Tensor]:
    """The flat buffer's order: kernels (>= 2-D) first, then 1-D tensors, layer by layer in each."""
    return ([p for layer in layers for p in layer.params if p.dim() > 1]
            + [p for layer in layers for p in layer.params if p.dim() <= 1])


def flatten_(params: Sequence[torch.Tensor], into=None) -> torch.Tensor:
    """Move the parameters' storage into one new flat buffer (each becomes a view of it with its
    own shape and strides, values unchanged) and return the buffer. Do it before anything keeps
    a ``p.detach()`` or ``p.data`` of them: those would still see the old storage. ``into(numel,
    dtype, device)``, if given, supplies the buffer (a row of the replicas' ``[S, N]`` one)."""
    dtypes = {p.dtype for p in params}
    if len(dtypes) != 1 or not params[0].is_floating_point():
        raise ValueError(f"a flat step needs parameters of one floating dtype, got {sorted(map(str, dtypes))}")
    if any(p.is_sparse or not _dense(p) for p in params):
        raise ValueError("a flat step needs dense parameters (no overlapping or strided views)")
    numel, dtype, device = sum(p.numel() for p in params), params[0].dtype, params[0].device
    flat = into(numel, dtype, device) if into is not None else torch.empty(numel, dtype=dtype, device=device)
    with torch.no_grad():
        for p, piece in zip(params, flat.split([p.numel() for p in params])):
            view = shaped_like(piece, p)
            view.copy_(p)
            p.data = view
    return flat


class FlatStep:
    """``step(scales, global_lr)``: the torch optimizer's step with group LRs ``global_lr·scales[layer]``.

    ``flat``: the buffer :func:`flatten_` moved the parameters into, in :func:`parameter_order`
    (the run does this before the controller sees the parameters); without it the parameters
    are moved here. ``sync_state()`` before ``optimizer.state_dict()``, ``load_state()`` after
    ``optimizer.load_state_dict()``.

    Replicas (:mod:`meta_llr.replicas`): ``optimizer`` a list of S optimizers of identical
    layout, ``flat`` their ``[S, N]`` buffer (row i holds replica i's parameters), ``stacked``
    the ``[S, *shape]`` leaves the batched backward writes gradients to, in the same order;
    ``scales`` is then ``[S, L]``. Every op is then one op over ``[S, N]``: the count per step
    does not grow with S. The replicas share the trainable mask and the step counts.
    """

    def __init__(self, optimizer, num_layers: int, flat: torch.Tensor | None = None,
                 stacked: Sequence[torch.Tensor] | None = None):
        optimizers = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
        first = optimizers[0]
        defaults = first.defaults
        if defaults.get("maximize") or defaults.get("amsgrad") or defaults.get("dampening", 0):
            raise ValueError("FlatStep steps SGD/AdamW without maximize, amsgrad, dampening")
        self.optimizer, self.optimizers, self.num_layers = first, optimizers, num_layers
        self.adam = isinstance(first, torch.optim.AdamW)
        orders = [self._order(o) for o in optimizers]
        entries = orders[0]
        self.params = [p for p, _ in entries]
        self.rows = [[p for p, _ in order] for order in orders]   # each replica's parameters, in order
        sizes = [p.numel() for p in self.params]
        self.sizes, self.numel = sizes, sum(sizes)
        decays = [g["weight_decay"] for _, g in entries]
        decayed = [d > 0 for d in decays]
        scaled = [g["scaled"] for _, g in entries]
        if decayed != sorted(decayed, reverse=True) or scaled != sorted(scaled, reverse=True):
            raise ValueError("decayed and scaled tensors must come first")  # true of layer_optimizer's groups
        mults = [float(g.get("lr_mult", 1.0)) for _, g in entries]
        if len(set(mults) - {1.0}) > 1:
            raise ValueError("FlatStep takes one LR multiplier besides 1")
        self.mult = max(set(mults) - {1.0}, default=1.0)
        self.boosted = [m != 1.0 for m in mults]
        self.any_boosted = any(self.boosted)
        self.decay = max(decays, default=0.0)
        self.n_decayed = sum(n for n, d in zip(sizes, decayed) if d)
        self.layer_of = [g["layer"] for _, g in entries]
        self.scaled = scaled
        device = self.params[0].device
        self.device, self.dtype = device, self.params[0].dtype
        # the per-element decay, where one value on a prefix does not say it
        self.decay_vec = (torch.repeat_interleave(torch.tensor(decays, dtype=self.dtype), torch.tensor(sizes))
                          .to(device) if len(set(d for d in decays if d > 0)) > 1 else None)
        self.S = len(optimizers)

        if flat is None:
            if self.S > 1:
                raise ValueError("replicas need their [S, N] buffer")
            flat = flatten_(self.params)
        self.flat = flat.view(self.S, self.numel) if flat.dim() == 1 else flat
        offsets = [0]
        for n in sizes[:-1]:
            offsets.append(offsets[-1] + n)
        for i, row in enumerate(self.rows):
            if any(p.data_ptr() != self.flat[i, o:].data_ptr() for p, o in zip(row, offsets)):
                raise ValueError("the parameters are not laid out in flat as parameter_order lays them out")
        self.stacked = list(stacked) if stacked is not None else None
        n_state = 2 if self.adam else (1 if defaults["momentum"] else 0)
        self.buffers = [torch.zeros(self.S, self.numel, dtype=self.dtype, device=device) for _ in range(n_state)]
        self.steps = [0] * len(self.params)   # AdamW: each parameter's step count, on the host
        self._link_state()
        self.zeros: torch.Tensor | None = None   # stand-in gradients of frozen parameters
        self.slot_tail = torch.tensor([0.0, 1.0, self.mult], dtype=self.dtype, device=device)  # slots L..L+2
        self.plain_layout = all(scaled) and not self.any_boosted   # every λ is its layer's scale ...
        self.plain = self.plain_layout                            # ... until a parameter freezes
        self.index = self._index([True] * len(self.params))
        self.active: tuple[bool, ...] | None = None   # the has-gradient pattern the masks are built for
        self.masks: dict[str, torch.Tensor] = {}

    @staticmethod
    def _order(optimizer) -> list:
        entries = [(p, g) for g in optimizer.param_groups for p in g["params"]]
        # kernels first, then 1-D tensors; layer by layer within each (groups are in layer order)
        entries.sort(key=lambda e: (e[0].dim() <= 1, e[1]["layer"]))
        return entries

    # ------------------------------------------------------------------ layout
    def _views(self, flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [shaped_like(piece, p) for piece, p in zip(flat.split(self.sizes), like)]

    def _link_state(self, only: int | None = None) -> None:
        """Point the torch optimizers' state entries at views of the flat state buffers."""
        keys = ("exp_avg", "exp_avg_sq") if self.adam else ("momentum_buffer",)
        for r, (optimizer, row) in enumerate(zip(self.optimizers, self.rows)):
            if only is not None and r != only:
                continue
            per_key = [self._views(buffer[r], row) for buffer in self.buffers]
            for i, p in enumerate(row):
                state = optimizer.state[p]
                for key, views in zip(keys, per_key):
                    state[key] = views[i]
                if self.adam:
                    state["step"] = torch.tensor(float(self.steps[i]), device=self.device)

    def _index(self, active: Sequence[bool]) -> torch.Tensor:
        """Element -> slot of ``[scales, 0, 1, μ, μ·scales]``: its layer, ``L`` (frozen), ``L+1``
        (unscaled), ``L+2`` (unscaled, multiplied), ``L+3+layer`` (multiplied)."""
        L = self.num_layers
        slots = [L if not a else ((L + 3 + layer if s else L + 2) if b else (layer if s else L + 1))
                 for layer, s, a, b in zip(self.layer_of, self.scaled, active, self.boosted)]
        counts = torch.tensor(self.sizes)
        return torch.repeat_interleave(torch.tensor(slots, dtype=torch.int32), counts).to(self.device)

    def _lam(self, scales: torch.Tensor) -> torch.Tensor:
        """``λ`` ``[S, N]`` from the ``[S, L]`` scales: one gather, from the slots' table unless plain."""
        if self.plain:
            return scales[:, self.index]
        table = [scales, self.slot_tail.expand(self.S, 3)]
        if self.any_boosted:
            table.append(scales * self.mult)
        return torch.cat(table, 1)[:, self.index]

    def param_lrs(self, scales: torch.Tensor, global_lr: float) -> dict[torch.Tensor, float]:
        """Each parameter's LR in a step given ``scales`` (host values, for inspection and tests)."""
        lam = self._lam(scales.to(self.dtype).reshape(-1)[:self.num_layers].view(1, -1))[0]
        starts = torch.tensor([0, *self.sizes[:-1]]).cumsum(0).tolist()
        return dict(zip(self.params, (lam[starts] * global_lr).tolist()))

    # ------------------------------------------------------------------ state
    def sync_state(self) -> None:
        """Write the host step counts into the torch optimizers' state (before ``state_dict()``)."""
        if self.adam:
            for optimizer, row in zip(self.optimizers, self.rows):
                for p, k in zip(row, self.steps):
                    optimizer.state[p]["step"].fill_(float(k))

    def load_state(self, only: int | None = None) -> None:
        """Take the state ``optimizer.load_state_dict`` installed into the flat buffers (of
        replica ``only``, or of all)."""
        keys = ("exp_avg", "exp_avg_sq") if self.adam else ("momentum_buffer",)
        with torch.no_grad():
            for r, (optimizer, row) in enumerate(zip(self.optimizers, self.rows)):
                if only is not None and r != only:
                    continue
                for key, buffer in zip(keys, self.buffers):
                    for p, view in zip(row, self._views(buffer[r], row)):
                        value = optimizer.state.get(p, {}).get(key)
                        view.copy_(value if value is not None else torch.zeros_like(view))
                if self.adam:
                    self.steps = [int(optimizer.state.get(p, {}).get("step", torch.zeros(())).item()) for p in row]
        self._link_state(only)
        self.active = None

    # ------------------------------------------------------------------ the step
    def _masks(self, active: tuple[bool, ...]) -> None:
        """Per-element factors for a step in which some parameters have no gradient."""
        self.active = active
        self.index = self._index(active)
        self.masks = {}
        if all(active) and len(set(self.steps)) == 1:
            return   # nothing to mask (unscaled 1-D tensors are the slot index's job)
        on = torch.repeat_interleave(torch.tensor(active, dtype=self.dtype),
                                     torch.tensor(self.sizes)).to(self.device)
        if not all(active):
            decayed = self.decay_vec
            if decayed is None:
                decayed = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
                decayed[:self.n_decayed] = self.decay
            self.masks["decay"] = decayed * on
        defaults = self.optimizer.defaults
        if self.adam:
            beta1, beta2 = defaults["betas"]
            self.masks["beta1"] = (1 - beta1) * on           # lerp weight: 0 keeps m
            self.masks["beta2"] = 1 - (1 - beta2) * on       # 1 keeps v
            self.masks["on"] = on
            self.masks["steps"] = torch.repeat_interleave(torch.tensor(self.steps, dtype=torch.float64),
                                                          torch.tensor(self.sizes)).to(self.device)
        elif defaults["momentum"]:
            self.masks["momentum"] = 1 - (1 - defaults["momentum"]) * on   # 1 keeps the buffer

    def _grads(self) -> tuple[tuple[bool, ...], list]:
        """Each parameter's gradient as ``[S, n]`` (views), None where it has none."""
        if self.stacked is None:
            grads = [p.grad for p in self.params]
            return tuple(g is not None for g in grads), [flat_view(g) if g is not None else None for g in grads]
        grads = [p.grad for p in self.stacked]
        return tuple(g is not None for g in grads), [g.view(self.S, -1) if g is not None else None for g in grads]

    @torch.no_grad()
    def step(self, scales: torch.Tensor, global_lr: float) -> None:
        active, grads = self._grads()
        if active != self.active:
            self._masks(active)
            self.plain = all(active) and self.plain_layout
            if not all(active) and self.zeros is None:
                shape = (max(self.sizes),) if self.stacked is None else (self.S, max(self.sizes))
                self.zeros = torch.zeros(shape, dtype=self.dtype, device=self.device)
        zeros = self.zeros
        pieces = [g if g is not None else (zeros[:n] if self.stacked is None else zeros[:, :n])
                  for g, n in zip(grads, self.sizes)]
        g = torch.cat(pieces, dim=-1).view(self.S, self.numel)
        lam = self._lam(scales.to(self.dtype).reshape(self.S, self.num_layers))
        theta, masks, defaults = self.flat, self.masks, self.optimizer.defaults
        if self.adam:
            self._adamw(theta, g, lam, global_lr, masks, defaults, active)
        else:
            self._sgd(theta, g, lam, global_lr, masks, defaults)

    def _sgd(self, theta, g, lam, lr, masks, defaults) -> None:
        if self.decay:
            decay = masks.get("decay", self.decay_vec)   # per element; None: one value on a prefix
            if decay is not None:
                g.addcmul_(theta, decay)
            else:
                g[:, :self.n_decayed].add_(theta[:, :self.n_decayed], alpha=self.decay)
        momentum = defaults["momentum"]
        if momentum:
            buf = self.buffers[0]
            if "momentum" in masks:
                torch.addcmul(g, buf, masks["momentum"], out=buf)
            else:
                torch.add(g, buf, alpha=momentum, out=buf)
            if defaults["nesterov"]:
                g.add_(buf, alpha=momentum)
            else:
                g = buf
        theta.addcmul_(g, lam, value=-lr)

    def _adamw(self, theta, g, lam, lr, masks, defaults, active) -> None:
        beta1, beta2 = defaults["betas"]
        m, v = self.buffers
        self.steps = [k + 1 if a else k for k, a in zip(self.steps, active)]
        if self.decay:
            n, decay = self.n_decayed, masks.get("decay", self.decay_vec)
            if decay is not None:
                theta.addcmul_(theta * lam, decay, value=-lr)
            else:
                theta[:, :n].addcmul_(theta[:, :n], lam[:, :n], value=-lr * self.decay)
        if "beta1" in masks:
            m.lerp_(g, masks["beta1"])
            v.mul_(masks["beta2"]).addcmul_(g, g, value=1 - beta2)
            steps = masks["steps"].add_(masks["on"]).clamp(min=1)
            bc1 = 1 - torch.pow(beta1, steps)
            bc2 = (1 - torch.pow(beta2, steps)).sqrt_()
            denom = v.sqrt().div_(bc2).add_(defaults["eps"])
            theta.addcdiv_(m * lam / bc1, denom, value=-lr)
            return
        k = self.steps[0]
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = v.sqrt().div_(math.sqrt(1 - beta2 ** k)).add_(defaults["eps"])
        theta.addcdiv_(m * lam, denom, value=-lr / (1 - beta1 ** k))


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: some permutation of the dims is contiguous."""
    return t.permute(memory_order(t)).is_contiguous()
