"""``replay``: a fixed LLR schedule read from a file, e.g. one exported from another run.

    scale_l(p) = piecewise-linear interpolation of layer l's knots at p = step / total_steps

(constant before the first and after the last knot). Files come from
``python -m meta_llr.export RUN_DIR`` (schema in ``meta_llr/export.py``): an adaptive
controller's trace, replayed as a fixed curve, separates the gain of its *schedule* from the
gain of its *reaction* to the run. The global LR policy is the replaying run's own.

``match=name`` (default): the schedule's layer names must be the model's, in order.
``match=depth``: layer ``l`` of the model, at relative depth ``d_l = l / (L - 1)``, takes the
schedule interpolated linearly in depth between the two schedule layers around ``d_l``; so
a schedule learned on ResNet-20 replays on ResNet-56.

Like the other closed-form baselines, the whole ``[steps, layers]`` table is computed once at
setup; a step only reads a row. A scale of exactly 0 freezes the layer (``trainable``).
"""
import json

import numpy as np

from baselines._closed_form import ClosedForm
from meta_llr.errors import UserError
from meta_llr.interface import register

MATCHES = ("name", "depth")


@register("replay")
class Replay(ClosedForm):
    """Replays ``schedule`` (a meta_llr.export JSON file), matching layers by ``match``."""

    def __init__(self, schedule: str | None = None, match: str = "name"):
        from meta_llr.export import load_schedule

        if not schedule:
            raise UserError("controller=replay needs a schedule file: controller.schedule=PATH "
                            "(write one with python -m meta_llr.export RUN_DIR)")
        if match not in MATCHES:
            raise UserError(f"controller.match must be name or depth, got {match!r}")
        self.schedule_path, self.match = schedule, match
        self.schedule = load_schedule(schedule)
        self.source = self.schedule["layers"]

    def setup(self, layers, plan) -> None:
        names = [layer.name for layer in layers]
        source_names = [layer["name"] for layer in self.source]
        if self.match == "name" and source_names != names:
            if len(source_names) != len(names):
                problem = f"has {len(source_names)} layers but the model has {len(names)}"
            else:
                first = next(i for i, (a, b) in enumerate(zip(source_names, names)) if a != b)
                problem = f"names layer {first} '{source_names[first]}' but the model calls it '{names[first]}'"
            raise UserError(f"schedule {self.schedule_path} {problem}; use the model it was exported from "
                            "or set controller.match=depth to map layers by relative depth")
        super().setup(layers, plan)

    def curve(self, progress, depth):
        per_source = np.stack([np.interp(progress, layer["knots"], layer["values"])
                               for layer in self.source], axis=1)  # [T, S]
        if self.match == "name":
            return per_source
        count = len(self.source)
        source_depth = np.array([layer.get("depth", i / max(count - 1, 1)) for i, layer in enumerate(self.source)])
        if count == 1:
            return np.repeat(per_source, len(depth), axis=1)
        # weights[s, l]: linear interpolation in depth (a hat function around each source layer)
        weights = np.stack([np.interp(depth, source_depth, np.eye(count)[s]) for s in range(count)])
        return per_source @ weights

    @classmethod
    def example_options(cls, tmp_dir) -> dict:
        """A two-layer schedule (first layer 1.5 -> 0.5, last 0.5 -> 1.5) mapped by depth."""
        from meta_llr.export import FORMAT

        path = f"{tmp_dir}/example_schedule.json"
        layers = [{"name": "first", "index": 0, "depth": 0.0, "knots": [0.0, 1.0], "values": [1.5, 0.5]},
                  {"name": "last", "index": 1, "depth": 1.0, "knots": [0.0, 1.0], "values": [0.5, 1.5]}]
        with open(path, "w") as handle:
            json.dump({"format": FORMAT, "controller": "example", "tolerance": 0.0, "x": "progress",
                       "layers": layers}, handle)
        return {"schedule": path, "match": "depth"}
