"""Export a run's LLR trace as a fixed per-layer curve: ``python -m meta_llr.export RUN_DIR [--tol 0.02] [--out F]``.

Each layer's trace ``scale_l(p)`` (``llr.csv``, ``p`` = progress, the fraction of training) is
replaced by a piecewise-linear curve through knots taken from the trace: the fewest knots for
which the largest error ``max_p |fit(p) - scale_l(p)|`` stays within ``tol · range_l`` (the
layer's ``max - min`` over the run). The fewest knots are found exactly by a shortest path
over the trace points (a segment between two points is allowed when it keeps every point
between them within the tolerance; Imai & Iri 1986 is the classic treatment); the knot values
are then refit by least squares (``scipy.interpolate.make_lsq_spline``, degree 1) when that
lowers the largest error. ``controller=replay controller.curve=FILE`` replays the result.

Only the controller's scales are exported; the global LR schedule (``schedule=``, ``trainer.lr``)
is the replaying run's own.

Writes ``RUN_DIR/curve.json`` (or ``--out``), a curve file in the format of
:mod:`meta_llr.curves` (written and checked there), and next to it ``curve.png``: every layer's
trace against its fit.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

from meta_llr.curves import new_curve, write_curve
from meta_llr.errors import UserError
from meta_llr.runs import read_run


def segment_errors(x: np.ndarray, y: np.ndarray, start: int) -> np.ndarray:
    """``out[j]``: the largest error of the straight line from point ``start`` to point ``j``
    over the points between them (0 for ``j <= start + 1``)."""
    xs, ys = x[start + 1:], y[start + 1:]
    slope = (ys - y[start]) / (xs - x[start])               # [J] lines start -> j
    line = y[start] + slope[:, None] * (xs[None, :] - x[start])  # [J, K] line j evaluated at point k
    error = np.abs(line - ys[None, :])
    error = np.where(np.tri(len(xs), k=-1, dtype=bool), error, 0.0)  # only points k < j
    out = np.zeros(len(x))
    out[start + 1:] = error.max(axis=1) if len(xs) else 0.0
    return out


def fewest_knots(x, y, tol_abs: float) -> list[int]:
    """Indices of the fewest trace points whose piecewise-linear interpolant is within ``tol_abs``
    of every point (shortest path from the first to the last point)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = len(x)
    if n <= 2:
        return list(range(n))
    cost = np.full(n, np.inf)
    prev = np.full(n, -1)
    cost[0] = 1
    for i in range(n - 1):  # points in order: cost[i] is final when reached
        reachable = np.flatnonzero(segment_errors(x, y, i) <= tol_abs + 1e-12)
        reachable = reachable[reachable > i]
        better = reachable[cost[i] + 1 < cost[reachable]]
        cost[better] = cost[i] + 1
        prev[better] = i
    path = [n - 1]
    while path[-1] != 0:
        path.append(int(prev[path[-1]]))
    return path[::-1]


def fit_layer(x, y, tol: float) -> dict:
    """Fewest-knot piecewise-linear fit of one layer's trace, within ``tol`` times its range."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    span = float(y.max() - y.min())
    if span <= 1e-9 * max(1.0, float(np.abs(y).max())):  # constant: one value
        value = float(np.mean(y))
        return {"knots": [float(x[0]), float(x[-1])], "values": [value, value], "range": span,
                "max_error": float(np.abs(y - value).max())}
    knots = fewest_knots(x, y, tol * span)
    knot_x, values = x[knots], y[knots]
    error = float(np.abs(np.interp(x, knot_x, values) - y).max())
    if len(knots) > 2:
        try:
            from scipy.interpolate import make_lsq_spline
            spline = make_lsq_spline(x, y, np.r_[knot_x[0], knot_x, knot_x[-1]], k=1)
            refit = spline(knot_x)
            refit_error = float(np.abs(np.interp(x, knot_x, refit) - y).max())
            # a scale is >= 0 and a frozen layer's 0 stays exactly 0 (replay freezes on it)
            keeps = bool((refit >= 0).all() and (refit[values == 0] == 0).all())
            if refit_error < error and keeps:
                values, error = refit, refit_error
        except (ValueError, np.linalg.LinAlgError):
            pass
    return {"knots": knot_x.tolist(), "values": [float(v) for v in values], "range": span, "max_error": error}


def export_run(run_dir, tol: float = 0.02) -> dict:
    """The curve (a :mod:`meta_llr.curves` document) fitted to the LLR trace of ``run_dir``."""
    if not (tol > 0 and math.isfinite(tol)):
        raise UserError(f"--tol must be > 0 (a fraction of each layer's range), got {tol}")
    run = read_run(run_dir)
    if run.problem:
        raise UserError(f"cannot read the run in {run_dir} ({run.problem})")
    trace = run.trace
    if trace is None:
        raise UserError(f"{run_dir} has no llr.csv with rows; give a run directory written by meta_llr.train")
    names, array = trace
    progress = array[:, 1]
    bad = ~np.isfinite(array[:, 3:3 + len(names)])
    if bad.any():
        row, index = map(int, np.argwhere(bad)[0])
        raise UserError(f"{run_dir}: layer {names[index]} has a non-finite scale from step {int(array[row, 0])} "
                        f"(status {run.status}); export a run whose scales stayed finite")
    count = len(names)
    layers = []
    for index, name in enumerate(names):
        fit = fit_layer(progress, array[:, 3 + index], tol)
        layers.append({"name": name, "index": index, "depth": index / (count - 1) if count > 1 else 0.0, **fit})
    return new_curve(layers, source_run=str(run_dir), controller=run.controller,
                     model=run.summary.get("model") or run.get("model.name"),
                     data=run.summary.get("data") or run.get("data.name"), epochs=run.get("trainer.epochs"),
                     steps=run.summary.get("steps"), status=run.status, tolerance=tol)


def plot_fit(run_dir, curve: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, array = read_run(run_dir).trace
    layers = curve["layers"]
    cols = min(4, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.6 * rows), squeeze=False, sharex=True)
    for ax in axes.flat[len(layers):]:
        ax.axis("off")
    for ax, layer in zip(axes.flat, layers):
        ax.plot(array[:, 1], array[:, 3 + layer["index"]], color="C0", lw=4, alpha=0.35, label="trace")
        ax.plot(layer["knots"], layer["values"], "o--", color="C3", ms=3.5, lw=1.2,
                label=f"fit ({len(layer['knots'])} knots)")
        ax.set_title(layer["name"], fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("progress")
    for ax in axes[:, 0]:
        ax.set_ylabel("LLR scale")
    fig.suptitle(f"{curve['controller']} exported at tol {curve['tolerance']} of each layer's range",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meta_llr.export", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--tol", type=float, default=0.02, help="largest error, as a fraction of each layer's range")
    parser.add_argument("--out", default=None, help="curve JSON (default: RUN_DIR/curve.json; the PNG goes next to it)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if not Path(args.run_dir).is_dir():
            raise UserError(f"{args.run_dir} is not a directory; give one run directory")
        curve = export_run(args.run_dir, args.tol)
        out = write_curve(args.out or Path(args.run_dir) / "curve.json", curve)
    except OSError as error:  # --out a directory, or under a file
        print(f"error: cannot write {args.out or 'curve.json'}: {error.strerror}; give --out a writable "
              f"file path", file=sys.stderr)
        return 2
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    plot_fit(args.run_dir, curve, out.with_suffix(".png"))
    knots = ", ".join(f"{layer['name']}: {len(layer['knots'])}" for layer in curve["layers"])
    print(f"{out} ({knots} knots) and {out.with_suffix('.png')}")
    print(f"replay: python -m meta_llr.train controller=replay controller.curve={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
