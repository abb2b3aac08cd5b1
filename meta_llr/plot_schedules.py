"""Draw every hand-crafted per-layer LR curve: ``python -m meta_llr.plot_schedules [--layers 10] [--out docs]``.

The command keeps its name; what it draws are the baselines' *curves* (``scale_l`` against the
fraction of training; the global LR *schedule* is :mod:`meta_llr.schedules`, held constant here).
For each ``controller=`` choice (every registered baseline and each preset such as
``fixed_linear_discussion``) whose controller lives in ``baselines/`` and needs no training
statistics, builds the controller from its defaults, runs its real ``setup`` on a stub net of ``--layers`` layers (a config whose
lists fix the layer count, like ``fixed_linear_discussion``, gets that count) and a run
of ``--epochs`` epochs, and plots ``scale`` against the fraction of training, one line
per layer coloured by depth. Writes ``OUT/schedules/NAME.png`` per config and the
combined page ``OUT/schedules.png``.
"""
from __future__ import annotations

import argparse
import math
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from meta_llr.errors import UserError
from meta_llr.interface import Controller, Layer, Plan
from meta_llr.registry import build_controller

# The order first; any other baseline config follows alphabetically.
ORDER = ("uniform", "depth_linear", "fixed_linear", "fixed_linear_discussion", "discriminative", "llrd",
         "freezeout", "unfreeze", "cascade_onecycle", "depth_cyclic", "soft_freeze")


def stub_setup(controller: Controller, num_layers: int, epochs: int = 10, steps_per_epoch: int = 100) -> None:
    """``controller.setup`` on a stand-in net of ``num_layers`` layers and a constant global LR."""
    layers = [Layer(index=i, name=f"layer{i}", depth=i / (num_layers - 1) if num_layers > 1 else 0.0,
                    params=[torch.zeros(1)], weight=torch.zeros(1, 1)) for i in range(num_layers)]
    total = epochs * steps_per_epoch
    plan = Plan(total_steps=total, steps_per_epoch=steps_per_epoch, epochs=epochs, device=torch.device("cpu"),
                lr_table=torch.ones(total))
    controller.setup(layers, plan)


def curve_table(controller: Controller, num_layers: int, epochs: int = 10, steps_per_epoch: int = 100) -> np.ndarray:
    """The scales ``[steps, layers]`` the controller gives over a whole stub run."""
    stub_setup(controller, num_layers, epochs, steps_per_epoch)
    total = controller.plan.total_steps
    return torch.stack([controller.scales(step) for step in range(total)]).cpu().numpy()


def baseline_configs(only: list[str] | None = None) -> dict[str, dict]:
    """Controller configs (by ``controller=`` name, presets included) whose controller is a
    stats-free baseline; of the names ``only`` if given (each composed only then)."""
    from meta_llr.config import compose, group_options
    from meta_llr.registry import available

    registry = available()
    choices = group_options("controller")
    if only:
        unknown = sorted(set(only) - set(choices))
        if unknown:
            raise UserError(f"no baseline config {', '.join(unknown)}; controller configs: {', '.join(choices)}")
        choices = [c for c in choices if c in only]
    configs = {}
    for choice in choices:
        try:
            config = OmegaConf.to_container(compose([f"controller={choice}"]).controller, resolve=True)
        except UserError as error:  # e.g. replay: nothing to draw without a curve file
            print(f"skipped {choice}: {error}", file=sys.stderr)
            continue
        cls = registry.get(config.get("name"))
        if cls is None or not cls.__module__.startswith("baselines.") or cls.needs:
            continue
        if cls.hooks() & {"observe", "transform_update"}:
            continue
        configs[choice] = config
    ranked = sorted(configs, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))
    return {name: configs[name] for name in ranked}


def describe(config: dict) -> str:
    options = ", ".join(f"{k}={v}" for k, v in config.items() if k != "name")
    return "\n".join(textwrap.wrap(options, 60)) or "no options"


def draw(ax, name: str, config: dict, table: np.ndarray, controller: Controller) -> None:
    import matplotlib.pyplot as plt

    steps, num_layers = table.shape
    progress = np.arange(steps) / steps
    colors = plt.cm.viridis(np.linspace(0, 0.9, num_layers))
    for layer in range(num_layers):
        label = "first layer" if layer == 0 else "last layer" if layer == num_layers - 1 else None
        ax.plot(progress, table[:, layer], color=colors[layer], lw=1.4, label=label)
    for layer, step in enumerate(getattr(controller, "frozen_at", [None] * num_layers)):
        if step is not None:
            ax.plot(step / steps, 0, "x", color=colors[layer], ms=6, mew=1.5)
    title = name if name == config["name"] else f"{name} ({config['name']})"
    ax.set_title(f"{title}, {num_layers} layers, {controller.plan.epochs} epochs", fontsize=11, loc="left")
    ax.text(0.99, 0.97, describe(config), transform=ax.transAxes, ha="right", va="top", fontsize=7,
            color="0.3", bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="0.85", alpha=0.85))
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=min(0.0, float(table.min())) - 0.02, top=float(table.max()) * 1.25 + 0.05)
    ax.set_xlabel("fraction of training")
    ax.set_ylabel("layer scale")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=7, framealpha=0.8)


def plot_all(out: Path, num_layers: int = 10, epochs: int = 10, steps_per_epoch: int = 100,
             only: list[str] | None = None) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = baseline_configs(only)
    if only and set(only) - set(configs):
        raise UserError(f"not a stats-free baseline: {', '.join(sorted(set(only) - set(configs)))}; "
                        f"--only takes baselines (baselines/) without statistics")
    panels = []
    for name, config in configs.items():
        try:
            controller = build_controller(config)
            layers = getattr(controller, "required_layers", lambda: None)() or num_layers
            table = curve_table(controller, layers, epochs, steps_per_epoch)
        except UserError as error:  # e.g. a baseline that needs a file to replay
            print(f"skipped {name}: {error}", file=sys.stderr)
            continue
        panels.append((name, config, table, controller))

    (out / "schedules").mkdir(parents=True, exist_ok=True)
    written = []
    for panel in panels:
        fig, ax = plt.subplots(figsize=(6, 3.6), layout="constrained")
        draw(ax, *panel)
        path = out / "schedules" / f"{panel[0]}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    if panels:
        columns = min(3, len(panels))
        rows = math.ceil(len(panels) / columns)
        fig, axes = plt.subplots(rows, columns, figsize=(5.6 * columns, 3.6 * rows), layout="constrained",
                                 squeeze=False)
        for ax, panel in zip(axes.flat, panels):
            draw(ax, *panel)
        for ax in axes.flat[len(panels):]:
            ax.axis("off")
        fig.suptitle("Hand-crafted per-layer LR curves: scale_l(t) multiplies the global LR "
                     "(one line per layer, first = dark; x: layer frozen from here on)", fontsize=12)
        path = out / "schedules.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=10, help="layers of the stand-in net (default 10)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of the stand-in run (default 10)")
    parser.add_argument("--out", default="docs", help="output folder (default docs)")
    parser.add_argument("--only", nargs="*", help="config names to draw (default: every baseline)")
    args = parser.parse_args(argv)
    try:
        if args.layers < 1 or args.epochs < 1:
            raise UserError("--layers and --epochs must be >= 1")
        for path in plot_all(Path(args.out), args.layers, args.epochs, only=args.only):
            print(path)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
