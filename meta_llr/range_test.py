"""``python -m meta_llr.range_test [OVERRIDES...] [--warmup N] [--steps N] [--low S] [--high S] [--out DIR]``:
a per-layer LR range test.

Smith's LR range test (Smith 2017, *Cyclical Learning Rates for Training Neural Networks*, §3.3)
raises the LR geometrically over a short stretch of training and reads where the loss falls
fastest and where it blows up. Here it is asked per layer. The run trains ``--warmup`` ordinary
steps (``uniform``), then its weights and buffers are kept as a snapshot and ``--steps`` batches
are drawn once. From that snapshot and on those batches, probe ``l`` raises layer ``l``'s scale
``s_k = low·(high/low)^(k/(steps−1))`` while every other layer stays at 1; a last probe raises
every layer together (the ordinary range test). A probe's steps are plain SGD,
``θ_l ← θ_l − η·s_k·g_l`` (η = ``trainer.lr``), with no momentum or weight decay, so its limit is
the layer's own step-size limit (about ``2/(η·h_l)`` for a layer of curvature ``h_l``). A probe
stops when its loss is not finite or exceeds 4 times its first; the snapshot is restored
exactly before the next one.

From each probe's losses: ``best``, the scale at the smallest loss smoothed by an exponential
moving average (factor 0.9, bias-corrected), and ``limit``, the largest scale before divergence
(:func:`read_probe`: where the loss began its rise into the first loss above 4 times the
smallest before it; the top of the range if there is none). Written to ``OUT``:

* ``range_test.csv``: ``probe, step, scale, loss`` for every step of every probe;
* ``range_test.md``: the table, the command, and a suggested starting profile: the least-squares
  line through ``log(best_l / best_all)`` against depth, as ``depth_linear`` (``first``,
  ``last``) and as ``fixed_linear`` (that profile at the start, reversed by the end, the
  discussion's shape);
* ``range_test.png``: smoothed loss against scale (log x), one line per probe;
* ``curve.json``: a constant per-layer curve ``best_l / best_all`` for ``controller=replay``.

The command states the total number of steps before it starts and shows a progress bar. A
probe measures one layer from one point of training: a guide to per-layer LRs, not the answer.
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

SMOOTHING = 0.9
BLOW_UP = 4.0


class RangeProbe:
    """The scales of one probe: ``low · (high/low)^(step/(steps-1))`` (held at ``high`` after
    ``steps``) for layer ``layer``, or for all layers (``layer=None``)."""

    def __init__(self, layer: int | None, low: float, high: float, steps: int):
        self.layer, self.low, self.high, self.steps = layer, low, high, steps

    def scale_at(self, step: int) -> float:
        t = min(step / max(self.steps - 1, 1), 1.0)
        return self.low * (self.high / self.low) ** t


def stops(losses: list[float]) -> bool:
    """Whether a probe stops at its last loss: not finite, or above 4 times its first."""
    return not math.isfinite(losses[-1]) or losses[-1] > BLOW_UP * losses[0]


def sweep(model: torch.nn.Module, loss_of, batches, layer_params, lr: float, low: float, high: float,
          steps: int, bar=None) -> list[list[float]]:
    """One probe per layer, then one for all: from the model's present weights and buffers and on
    the same ``batches`` (a list of ``(x, y)``, used in order, cycled), ``steps`` plain SGD steps
    with layer ``l`` at ``lr·s_k`` and the others at ``lr``; each probe's losses (it stops early
    when a loss is not finite or exceeds 4 times its first). ``loss_of(model, x, y)`` is the
    training loss. The weights and buffers are restored exactly after every probe."""
    params = [p for group in layer_params for p in group]
    snapshot = [p.detach().clone() for p in params]
    buffers = list(model.buffers())
    saved_buffers = [b.clone() for b in buffers]
    results = []
    for probe in [*range(len(layer_params)), None]:
        scales = RangeProbe(probe, low, high, steps)
        losses: list[float] = []
        for k in range(steps):
            x, y = batches[k % len(batches)]
            loss = loss_of(model, x, y)
            losses.append(float(loss.detach()))  # one host read a step: this is a diagnostic, not training
            if bar is not None:
                bar.update(1)
            if stops(losses):
                break
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            with torch.no_grad():
                i = 0
                for l, group in enumerate(layer_params):
                    step = lr * (scales.scale_at(k) if probe is None or probe == l else 1.0)
                    for p in group:
                        if grads[i] is not None:
                            p.sub_(grads[i], alpha=step)
                        i += 1
        if bar is not None:
            bar.update(steps - len(losses))
        with torch.no_grad():
            for p, value in zip(params, snapshot):
                p.copy_(value)
            for b, value in zip(buffers, saved_buffers):
                b.copy_(value)
        results.append(losses)
    return results


def read_probe(losses: list[float], probe: RangeProbe, stopped_at: int | None = None) -> dict:
    """``best`` and ``limit`` scales from one probe's per-step losses (``losses[k]`` measured
    before the step at scale ``s_k``). ``best``: the scale at the smallest smoothed loss.
    ``limit``, the largest scale before divergence: at the first loss above 4 times the smallest
    before it (or not finite), walk back over the losses rising into it to where the rise
    began, at ``j``; the step at ``s_j`` was the first to raise the loss, so ``limit = s_{j−1}``.
    Without such a loss, ``limit`` is the scale where the probe stopped (``stopped_at``), else
    the top of the range."""
    smoothed, average = [], 0.0
    for k, loss in enumerate(losses):
        if not math.isfinite(loss):
            break
        average = SMOOTHING * average + (1 - SMOOTHING) * loss
        smoothed.append(average / (1 - SMOOTHING ** (k + 1)))
    if not smoothed:
        return {"best": math.nan, "limit": probe.low, "smoothed": []}
    low_at = int(np.argmin(smoothed))
    lowest, blow = losses[0], None
    for k in range(1, len(losses)):
        if not math.isfinite(losses[k]) or losses[k] > BLOW_UP * lowest:
            blow = k
            break
        lowest = min(lowest, losses[k])
    if blow is not None:
        j = blow
        while j > 0 and math.isfinite(losses[j - 1]) and losses[j - 1] < losses[j]:
            j -= 1
        limit = probe.scale_at(max(j - 1, 0))
    else:
        limit = probe.scale_at(stopped_at) if stopped_at is not None else probe.high
    return {"best": probe.scale_at(low_at), "limit": limit, "smoothed": smoothed, "min_loss": smoothed[low_at]}


def range_test(overrides: list[str], out: Path, steps: int = 100, low: float = 1e-3, high: float = 1e2,
               warmup: int = 20) -> list[dict]:
    """Warm up, snapshot, sweep every probe; one row per probe (``name``, ``index``, ``status``,
    ``best``, ``limit``, ``losses``, ``smoothed``)."""
    from tqdm import tqdm

    from meta_llr.config import compose
    from meta_llr.run import build_run

    if not (0 < low < high) or steps < 2 or warmup < 0:
        raise UserError(f"--low {low} --high {high} --steps {steps} --warmup {warmup}: need 0 < low < high, "
                        "steps >= 2 and warmup >= 0")
    cfg = compose([*overrides, "controller=uniform", "schedule=constant", "trainer.checkpoint=false", "quiet=true"])
    shutil.rmtree(out / ".run", ignore_errors=True)
    run = build_run(cfg, out / ".run")
    try:
        layers = run.layers
        total = warmup + (len(layers) + 1) * steps
        print(f"range test: {warmup} warm-up steps, then {len(layers) + 1} probes x {steps} steps "
              f"= {total} steps in all ({len(layers)} layers and all together)", flush=True)
        bar = tqdm(total=total, unit="step", desc="range test", dynamic_ncols=True)

        def draw():
            while True:
                yield from run.batches()

        batches = draw()
        for _ in range(warmup):
            run.train_step(*next(batches))
            bar.update(1)
        sweep_batches = [next(batches) for _ in range(steps)]

        def loss_of(model, x, y):
            return run._loss_fn(model(run.normalize(x)), y)

        all_losses = sweep(run.model, loss_of, sweep_batches, [list(layer.params) for layer in layers],
                           float(cfg.trainer.lr), low, high, steps, bar)
        bar.close()
    finally:
        run.close()
        shutil.rmtree(out / ".run", ignore_errors=True)
    rows = []
    for index, (name, losses) in enumerate(zip([layer.name for layer in layers] + ["all layers"], all_losses)):
        probe = RangeProbe(index if index < len(layers) else None, low, high, steps)
        stopped = stops(losses)
        rows.append({"name": name, "index": probe.layer, "status": "diverged" if stopped else "finished",
                     "losses": losses, **read_probe(losses, probe, len(losses) - 1 if stopped else None)})
    return rows


def suggested_profile(rows: list[dict]) -> tuple[float, float] | None:
    """(first, last): the least-squares line through ``log(best_l / best_all)`` against depth
    (0 at the first layer, 1 at the last), at depth 0 and 1."""
    overall = rows[-1]["best"]
    layer_rows = [r for r in rows[:-1] if math.isfinite(r["best"]) and r["best"] > 0]
    if len(layer_rows) < 2 or not (math.isfinite(overall) and overall > 0):
        return None
    count = len(rows) - 1
    depth = np.array([r["index"] / max(count - 1, 1) for r in layer_rows])
    slope, intercept = np.polyfit(depth, np.log([r["best"] / overall for r in layer_rows]), 1)
    return float(np.exp(intercept)), float(np.exp(intercept + slope))


def write_outputs(rows: list[dict], out: Path, command: str, low: float, high: float, steps: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    from meta_llr.curves import new_curve, write_curve

    overall = rows[-1]["best"]
    lines = [f"# Per-layer LR range test\n\n`{command}`\n",
             "Each probe raises one layer's scale (the last, every layer's) geometrically from the same "
             "snapshot and on the same batches, plain SGD at trainer.lr; `best`: the scale at the smallest smoothed training loss; `limit`: where the smoothed "
             f"loss exceeds {BLOW_UP:g}x that minimum, or the run diverged; `profile`: best / best of all layers "
             "(the constant curve in curve.json).\n",
             "| probe | best scale | limit scale | profile | status |", "|---|---|---|---|---|"]
    for row in rows:
        profile = row["best"] / overall if overall and math.isfinite(overall) else math.nan
        lines.append(f"| {row['name']} | {row['best']:.3g} | {row['limit']:.3g} | {profile:.3g} | {row['status']} |")
    profile_line = suggested_profile(rows)
    if profile_line is not None:
        first, last = profile_line
        lines += ["", "Suggested starting profile (the least-squares line through log(best / best of all "
                  "layers) against depth):", "",
                  f"- `controller=depth_linear controller.first={first:.3g} controller.last={last:.3g}`",
                  f"- `controller=fixed_linear controller.start=[{first:.3g},{last:.3g}] "
                  f"controller.end=[{last:.3g},{first:.3g}]` (reversed by the end)"]
    (out / "range_test.md").write_text("\n".join(lines) + "\n")
    with open(out / "range_test.csv", "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["probe", "step", "scale", "loss"])
        for row in rows:
            probe = RangeProbe(row["index"], low, high, steps)
            writer.writerows([row["name"], k, f"{probe.scale_at(k):.6g}", f"{loss:.6g}"]
                             for k, loss in enumerate(row["losses"]))
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
    parser.add_argument("--warmup", type=int, default=20, help="ordinary (uniform) steps before the snapshot")
    parser.add_argument("--steps", type=int, default=100, help="steps over which a scale rises from low to high")
    parser.add_argument("--low", type=float, default=1e-3)
    parser.add_argument("--high", type=float, default=1e2)
    parser.add_argument("--out", default="runs/range_test", help="folder for the probes and the outputs")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    try:
        rows = range_test(args.overrides, out, args.steps, args.low, args.high, args.warmup)
        command = "python -m meta_llr.range_test " + shlex.join(
            [*args.overrides, "--warmup", str(args.warmup), "--steps", str(args.steps), "--low", f"{args.low:g}",
             "--high", f"{args.high:g}"])
        write_outputs(rows, out, command, args.low, args.high, args.steps)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print((out / "range_test.md").read_text())
    print(f"-> {out / 'range_test.md'}, {out / 'curve.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
