"""``python -m meta_llr.range_test [OVERRIDES...] [--steps N] [--low S] [--high S] [--out DIR]``:
a per-layer LR range test.

Smith's LR range test (Smith 2017, *Cyclical Learning Rates for Training Neural Networks*, §3.3)
raises the LR geometrically during one short run and reads where the loss falls fastest and
where it blows up. Here it is done per layer: probe ``l`` keeps every other layer at scale 1 and
raises layer ``l``'s scale from ``--low`` to ``--high`` over ``--steps`` steps, at the constant
global LR ``trainer.lr`` (``schedule=constant``); a last probe raises every layer together (the
ordinary range test). Each probe is an ordinary run of the training loop (records in
``OUT/<probe>/``), checked for divergence at every step with ``trainer.divergence_factor=4``
(it stops ``diverged`` once the loss exceeds 4 times the first step's).

From each probe's per-step training loss, smoothed by an exponential moving average
(factor 0.9, bias-corrected): ``best``, the scale at the smallest smoothed loss, and ``limit``,
the first scale after it where the smoothed loss exceeds 4 times that minimum (or where the
run diverged; the top of the range if neither). Written to ``OUT``:

* ``range_test.md``: the table, with the command;
* ``range_test.png``: smoothed loss against scale (log x), one line per probe;
* ``curve.json``: a constant per-layer curve ``best_l / best_all`` (each layer's best scale
  relative to the all-layers probe's), for ``controller=replay controller.curve=OUT/curve.json``
  with ``trainer.lr`` set to ``best_all`` times the probe's: the layers' profile under a global
  LR the ordinary range test chose.

A probe measures one layer with the others at scale 1 and only the first ``--steps`` steps of
training: a guide to per-layer LRs, not the answer to them.
"""
from __future__ import annotations

import argparse
import csv
import math
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from meta_llr.errors import UserError
from meta_llr.interface import Controller
from meta_llr.records import TRAIN_LOSS

SMOOTHING = 0.9
BLOW_UP = 4.0


class RangeProbe(Controller):
    """Scale ``low · (high/low)^(step/(steps-1))`` (held at ``high`` after ``steps``) for one
    layer (``layer``) or for all (``layer=None``); every other layer 1."""

    def __init__(self, layer: int | None, low: float, high: float, steps: int):
        self.layer, self.low, self.high, self.steps = layer, low, high, steps

    def setup(self, layers, plan) -> None:
        t = (torch.arange(plan.total_steps, dtype=torch.float64) / max(self.steps - 1, 1)).clamp(max=1.0)
        growth = (self.low * (self.high / self.low) ** t).float()
        self.table = torch.ones(plan.total_steps, len(layers))
        if self.layer is None:
            self.table[:] = growth[:, None]
        else:
            self.table[:, self.layer] = growth
        self.table = self.table.to(plan.device)

    def scales(self, step: int) -> torch.Tensor:
        return self.table[step]

    def scale_at(self, step: int) -> float:
        t = min(step / max(self.steps - 1, 1), 1.0)
        return self.low * (self.high / self.low) ** t


def read_probe(losses: list[float], probe: RangeProbe, diverged_at: int | None) -> dict:
    """``best`` and ``limit`` scales from one probe's per-step training losses."""
    smoothed, average = [], 0.0
    for k, loss in enumerate(losses):
        if not math.isfinite(loss):
            break
        average = SMOOTHING * average + (1 - SMOOTHING) * loss
        smoothed.append(average / (1 - SMOOTHING ** (k + 1)))
    if not smoothed:
        return {"best": math.nan, "limit": probe.low, "smoothed": []}
    low_at = int(np.argmin(smoothed))
    limit_at = next((k for k in range(low_at, len(smoothed)) if smoothed[k] > BLOW_UP * smoothed[low_at]), None)
    if limit_at is None:
        limit_at = diverged_at if diverged_at is not None else None
    return {"best": probe.scale_at(low_at), "limit": probe.scale_at(limit_at) if limit_at is not None else probe.high,
            "smoothed": smoothed, "min_loss": smoothed[low_at]}


def range_test(overrides: list[str], out: Path, steps: int = 100, low: float = 1e-3, high: float = 1e2) -> list[dict]:
    """Run every probe; return one row per probe (``name``, ``best``, ``limit``, ``status``)."""
    import meta_llr
    from meta_llr.config import compose
    from meta_llr.run import build_run

    if not (0 < low < high) or steps < 2:
        raise UserError(f"--low {low} --high {high} --steps {steps}: need 0 < low < high and steps >= 2")
    # trainer.resume=auto: a rerun into the same folder reuses the probes that already ran.
    base = [*overrides, "schedule=constant", "trainer.log_every=1", "trainer.divergence_factor=4",
            "trainer.checkpoint=false", "trainer.resume=auto", "quiet=true"]
    scratch = out / ".layers"
    probe_run = build_run(compose(base), scratch)  # the layers, and the steps per epoch
    layers, steps_per_epoch = [layer.name for layer in probe_run.layers], probe_run.steps_per_epoch
    probe_run.close()
    shutil.rmtree(scratch, ignore_errors=True)
    epochs = math.ceil(steps / steps_per_epoch)
    rows = []
    for index, name in [*enumerate(layers), (None, "all layers")]:
        probe, run_dir = RangeProbe(index, low, high, steps), out / name.replace(" ", "_")
        summary = meta_llr.fit(controller=probe, overrides=[*base, f"trainer.epochs={epochs}"], out_dir=run_dir).summary
        with open(run_dir / TRAIN_LOSS, newline="") as handle:
            losses = [float(row["train_loss"]) for row in csv.DictReader(handle)][:steps]
        diverged = summary.get("diverged_at_step") if summary["status"] == "diverged" else None
        rows.append({"name": name, "index": index, "status": summary["status"],
                     **read_probe(losses, probe, None if diverged is None else diverged - 1)})
    return rows


def write_outputs(rows: list[dict], out: Path, command: str, low: float, high: float, steps: int) -> None:
    from meta_llr.curves import new_curve, write_curve

    overall = rows[-1]["best"]
    lines = [f"# Per-layer LR range test\n\n`{command}`\n",
             "Each probe raises one layer's scale (the last, every layer's) geometrically at a constant "
             "global LR; `best`: the scale at the smallest smoothed training loss; `limit`: where the smoothed "
             f"loss exceeds {BLOW_UP:g}x that minimum, or the run diverged; `profile`: best / best of all layers "
             "(the constant curve in curve.json).\n",
             "| probe | best scale | limit scale | profile | status |", "|---|---|---|---|---|"]
    for row in rows:
        profile = row["best"] / overall if overall and math.isfinite(overall) else math.nan
        lines.append(f"| {row['name']} | {row['best']:.3g} | {row['limit']:.3g} | {profile:.3g} | {row['status']} |")
    (out / "range_test.md").write_text("\n".join(lines) + "\n")
    layer_rows = rows[:-1]
    profile = [row["best"] / overall if overall and math.isfinite(overall) and math.isfinite(row["best"]) else 1.0
               for row in layer_rows]
    depth = [i / max(len(layer_rows) - 1, 1) for i in range(len(layer_rows))]
    write_curve(out / "curve.json", new_curve(
        [{"name": row["name"], "index": i, "depth": d, "knots": [0.0], "values": [p]}
         for i, (row, d, p) in enumerate(zip(layer_rows, depth, profile))],
        controller="range_test", source_run=str(out)))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        probe = RangeProbe(row["index"], low, high, steps)
        xs = [probe.scale_at(k) for k in range(len(row["smoothed"]))]
        ax.plot(xs, row["smoothed"], label=row["name"], lw=2.5 if row["index"] is None else 1.2)
    ax.set_xscale("log")
    ax.set_xlabel("scale of the probed layer(s) (x trainer.lr)")
    ax.set_ylabel("training loss (smoothed)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "range_test.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meta_llr.range_test", description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="training overrides (model=, data=, trainer.lr=, ...)")
    parser.add_argument("--steps", type=int, default=100, help="steps over which a scale rises from low to high")
    parser.add_argument("--low", type=float, default=1e-3)
    parser.add_argument("--high", type=float, default=1e2)
    parser.add_argument("--out", default="runs/range_test", help="folder for the probes and the outputs")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    try:
        rows = range_test(args.overrides, out, args.steps, args.low, args.high)
        command = "python -m meta_llr.range_test " + shlex.join(
            [*args.overrides, "--steps", str(args.steps), "--low", f"{args.low:g}", "--high", f"{args.high:g}"])
        write_outputs(rows, out, command, args.low, args.high, args.steps)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print((out / "range_test.md").read_text())
    print(f"-> {out / 'range_test.md'}, {out / 'curve.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
