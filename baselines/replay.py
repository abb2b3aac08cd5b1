"""``replay``: a fixed per-layer curve read from a file, e.g. one exported from another run.

    scale_l(p) = piecewise-linear interpolation of layer l's knots at p = step / total_steps

(constant before the first and after the last knot). Files come from
``python -m meta_llr.export RUN_DIR`` (``curve.json``; the format is :mod:`meta_llr.curves`): an
adaptive controller's trace, replayed as a fixed curve, separates the gain of its *curve* from
the gain of its *reaction* to the run. The global LR schedule is the replaying run's own.

``match=name`` (default): the curve's layer names must be the model's, in order.
``match=depth``: layer ``l`` of the model, at relative depth ``d_l = l / (L - 1)``, takes the
curve interpolated linearly in depth between the two curve layers around ``d_l``; so a curve
learned on ResNet-20 replays on ResNet-56 (:func:`meta_llr.curves.match_layers`).

Like the other closed-form baselines, the curve is evaluated for every step at setup (to check
it and plan freezing) and then one epoch at a time. A scale of exactly 0 freezes the layer
(``trainable``).
"""
from baselines._closed_form import ClosedForm
from meta_llr.curves import MATCHES, layer_scales, load_curve, match_layers, new_curve, write_curve
from meta_llr.errors import UserError
from meta_llr.registry import register


@register("replay")
class Replay(ClosedForm):
    """Replays ``curve`` (a curve file, e.g. from meta_llr.export), matching layers by ``match``."""

    def __init__(self, curve: str | None = None, match: str = "name"):
        if not curve:
            raise UserError("controller=replay needs a curve file: controller.curve=PATH "
                            "(write one with python -m meta_llr.export RUN_DIR)")
        if match not in MATCHES:
            raise UserError(f"controller.match must be name or depth, got {match!r}")
        self.curve_path, self.match = curve, match
        self.curve_file = load_curve(curve)
        self.depth_weights = None  # [S, L] with match=depth, set in setup

    def setup(self, layers, plan) -> None:
        self.depth_weights = match_layers(self.curve_file, [layer.name for layer in layers],
                                    [layer.depth for layer in layers], self.match, self.curve_path)
        super().setup(layers, plan)

    def curve(self, progress, depth):
        return layer_scales(self.curve_file, progress, self.depth_weights)

    @classmethod
    def example_options(cls, tmp_dir) -> dict:
        """A two-layer curve (first layer 1.5 -> 0.5, last 0.5 -> 1.5) mapped by depth."""
        path = f"{tmp_dir}/example_curve.json"
        layers = [{"name": "first", "index": 0, "depth": 0.0, "knots": [0.0, 1.0], "values": [1.5, 0.5]},
                  {"name": "last", "index": 1, "depth": 1.0, "knots": [0.0, 1.0], "values": [0.5, 1.5]}]
        write_curve(path, new_curve(layers, controller="example", tolerance=0.0))
        return {"curve": path, "match": "depth"}
