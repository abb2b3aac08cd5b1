"""Per-layer curves: each layer's LR scale as a fixed function of training progress, and its file.

A **curve** is ``scale_l(p)`` for every layer ``l``, with ``p`` the progress (the fraction of
training, 0..1): the part of ``lr_layer(t) = global_lr(t) · scale_l(t)`` a controller gives.
(The global LR **schedule**, ``global_lr``, is :mod:`meta_llr.schedules`.) Curves are written by
``python -m meta_llr.export RUN_DIR`` (a run's LLR trace, fitted with the fewest knots) and
read by ``controller=replay controller.curve=FILE`` and by ``rnn_meta``'s replayed baseline.

Curve file (JSON), ``curve.json`` by default::

    {
      "format": "meta_llr.curve/1",
      "source_run": "runs/study/depth_linear-...",   # the run directory it came from
      "controller": "depth_linear",                  # the run's controller, model, data, epochs
      "model": "shallow", "data": "digits", "epochs": 10, "steps": 1200,
      "status": "finished",
      "tolerance": 0.02,                             # relative to each layer's range
      "x": "progress",                               # knots are fractions of training, 0..1
      "layers": [                                    # in forward order
        {"name": "conv1.conv", "index": 0, "depth": 0.0,   # depth = index / (L - 1)
         "knots": [0.0, 0.5, 0.99], "values": [1.5, 1.0, 0.5],
         "range": 1.0, "max_error": 0.004},
        ...
      ]
    }

Only ``format`` and each layer's ``knots`` (non-decreasing) and ``values`` (finite, >= 0, one per
knot) are required; ``name`` and ``depth`` are needed to map layers by name or by depth. Files
written before the rename carry the format ``meta_llr.schedule/1`` and are read the same way.

Between knots a layer's curve is linear; before the first and after the last knot it is
constant (:func:`evaluate`). Layers of a model map onto a curve's layers (:func:`match_layers`)
by ``name`` (the same layers, in order) or by ``depth``: model layer ``l`` at relative depth
``d_l = l / (L - 1)`` takes the curve interpolated linearly in depth between the two curve
layers around ``d_l``, so a curve fitted on ResNet-20 replays on ResNet-56.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from meta_llr.errors import UserError

FORMAT = "meta_llr.curve/1"
OLD_FORMATS = ("meta_llr.schedule/1",)  # read as FORMAT: the same layout under its former name
MATCHES = ("name", "depth")
WRITE_ONE = "write one with python -m meta_llr.export RUN_DIR"


def new_curve(layers: list[dict], **about) -> dict:
    """A curve document: ``format``, then ``about`` (source_run, controller, ..., in order),
    ``x`` and ``layers``."""
    return {"format": FORMAT, **about, "x": "progress", "layers": layers}


def check_curve(curve, where="curve") -> dict:
    """``curve`` if it is a valid curve document (see the module docstring), else a UserError
    naming ``where`` (e.g. the file) and the problem."""
    layers = curve.get("layers") if isinstance(curve, dict) else None
    if not isinstance(curve, dict) or curve.get("format") not in (FORMAT, *OLD_FORMATS) or not layers \
            or not isinstance(layers, list):
        raise UserError(f"{where} is not a meta_llr curve (format {FORMAT} with layers); {WRITE_ONE}")
    for number, layer in enumerate(layers):
        name = layer.get("name", number) if isinstance(layer, dict) else number
        knots = layer.get("knots") if isinstance(layer, dict) else None
        values = layer.get("values") if isinstance(layer, dict) else None
        if not _numbers(knots) or not _numbers(values) or len(knots) != len(values) \
                or not all(math.isfinite(k) for k in knots) or list(knots) != sorted(knots):
            raise UserError(f"{where}: layer {name} needs finite increasing knots and one value per knot")
        if not all(math.isfinite(v) and v >= 0 for v in values):
            raise UserError(f"{where}: layer {name} has negative or non-finite values")
        depth = layer.get("depth")
        if depth is not None and not (_numbers([depth]) and 0 <= depth <= 1):
            raise UserError(f"{where}: layer {name} has depth {depth}; depth is index / (L - 1), in [0, 1]")
    return curve


def _numbers(values) -> bool:
    return (isinstance(values, Sequence) and not isinstance(values, str) and len(values) > 0
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values))


def load_curve(path) -> dict:
    """Read and check a curve file; UserError naming the problem."""
    path = Path(path)
    try:
        curve = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"curve file {path} not found; {WRITE_ONE}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"curve file {path} is not readable JSON ({' '.join(str(error).split())}); {WRITE_ONE}") from None
    return check_curve(curve, str(path))


def write_curve(path, curve: dict) -> Path:
    """Check ``curve`` and write it to ``path`` as indented JSON (write, then rename)."""
    from meta_llr.records import write_atomic

    path = Path(path)
    check_curve(curve, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(curve, indent=2) + "\n")
    return path


def evaluate(layer: dict, progress) -> np.ndarray:
    """One curve layer's scale at ``progress`` (a number or an array of fractions of training):
    linear between knots, constant outside them."""
    return np.interp(progress, layer["knots"], layer["values"])


def evaluate_all(curve: dict, progress) -> np.ndarray:
    """Every curve layer's scale at the fractions of training ``progress [T]``: ``[T, S]``."""
    return np.stack([evaluate(layer, progress) for layer in curve["layers"]], axis=1)


def match_layers(curve: dict, names: Sequence[str], depth, match: str = "name", where="curve") -> np.ndarray | None:
    """How a model's layers (``names``, relative ``depth [L]``) take the curve's ``S`` layers:
    ``None`` for ``match=name`` (the same layers: their names must equal the curve's, in order),
    else weights ``[S, L]`` with ``model scales = evaluate_all(curve, p) @ weights``
    (``match=depth``: linear interpolation in depth, a hat function around each curve layer)."""
    if match not in MATCHES:
        raise UserError(f"controller.match must be name or depth, got {match!r}")
    source = curve["layers"]
    if match == "name":
        source_names = [layer.get("name") for layer in source]
        if source_names != list(names):
            if len(source_names) != len(names):
                problem = f"has {len(source_names)} layers but the model has {len(names)}"
            else:
                first = next(i for i, (a, b) in enumerate(zip(source_names, names)) if a != b)
                problem = f"names layer {first} '{source_names[first]}' but the model calls it '{names[first]}'"
            raise UserError(f"curve {where} {problem}; use the model it was exported from "
                            "or set controller.match=depth to map layers by relative depth")
        return None
    count = len(source)
    depth = np.asarray(depth, dtype=np.float64)
    if count == 1:
        return np.ones((1, len(depth)))
    source_depth = np.array([layer.get("depth", i / (count - 1)) for i, layer in enumerate(source)])
    return np.stack([np.interp(depth, source_depth, np.eye(count)[s]) for s in range(count)])


def layer_scales(curve: dict, progress, weights: np.ndarray | None = None) -> np.ndarray:
    """The model's scales ``[T, L]`` at ``progress [T]``, with ``weights`` from :func:`match_layers`."""
    per_source = evaluate_all(curve, progress)
    return per_source if weights is None else per_source @ weights
