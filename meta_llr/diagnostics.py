"""Per-layer diagnostics recorded at every evaluation, whatever the controller.

For each layer l, at the last training step before an evaluation:

* ``rotation``: layer rotation, the cosine distance ``1 − cos(θ_l(t), θ_l(0))`` between the
  layer's kernels now and at initialisation (Carbonnelle & De Vleeschouwer, "Layer rotation:
  a surprisingly powerful indicator of generalization in deep networks?", arXiv 1806.01603);
  needs one copy of the initial kernels, ``diagnostics.rotation=false`` turns it off.
* ``weight_norm`` ``‖θ_l‖``, ``grad_norm`` ``‖g_l‖``, ``update_ratio`` ``‖u_l‖/‖θ_l‖``, and
  ``effective_lr`` ``global_lr · scale_l`` of that step.

Rows go to ``layer_stats.csv`` (one per evaluation and layer); the last values per layer go
into ``summary.json`` under ``layer_stats``.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from meta_llr.records import csv_text

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
        self.last: dict[str, torch.Tensor] | None = None
        self.rows: list[dict] = []

    def record_step(self, step: int, stats: Mapping[str, torch.Tensor]) -> None:
        """Keep the statistics of the last step before an evaluation (device tensors, no sync)."""
        self.last = {k: stats[k].detach().clone()
                     for k in ("grad_norm", "update_norm", "weight_norm", "scales", "global_lr")}
        self.last["step"] = step

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
        host = {k: v.float().cpu().tolist() for k, v in columns.items()}
        rows = []
        for i, layer in enumerate(self.layers):
            row = {"epoch": epoch, "step": step, "layer": i, "name": layer.name}
            row.update({k: values[i] for k, values in host.items()})
            rows.append(row)
        self.rows.extend(rows)
        return rows

    def csv(self) -> str:
        header = list(self.rows[-1]) if self.rows else ["epoch", "step", "layer", "name"]
        return csv_text(header, ([row.get(k, "") for k in header] for row in self.rows))

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
