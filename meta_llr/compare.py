"""Compare runs honestly: ``python -m meta_llr.compare RUN_DIRS... [options]``.

Reads run directories (a study folder, a sweep, single runs; see ``meta_llr.runs``), groups
them by controller (a study's runs carry their arm label, config key ``arm``, which takes the
controller's place; ``--by KEY``: any summary key or dotted config key), and writes
``compare.md``, ``compare.csv`` and PNG figures into ``--out``.

Pooling rules (never silent):

* runs with a different **setting** (data, model with its options, epochs) are never pooled:
  each setting is compared on its own and the report says so;
* inside a group, runs whose configs differ in anything else (LR, schedule, controller
  options; seeds and paths excepted) are split into sub-groups ``label [key=value]``;
* a ``diverged``, ``failed``, ``interrupted``, ``running``, ``incomplete`` or ``unreadable`` run
  (:data:`STATUSES`) is counted in its group and
  left out of every mean and test (its last numbers are not a result); the tables say how
  many and why (``5 runs, 1 diverged (loss_explosion)``; ``compare.csv`` columns ``diverged``
  and ``diverged_reasons``, e.g. ``loss_explosion:1``). A run at chance that finished is a
  result and stays in; a group whose mean final test accuracy is within 1 point (0.01) of
  ``chance_acc`` (the majority-class frequency of the test split, from ``summary.json``) is
  flagged ``at chance`` (column ``near_chance``) with a note.

Per group, over its finished runs (``n``): mean ± sample std (ddof 1) and the two-sided 95%
t confidence interval ``mean ± t_{0.975, n-1} s / sqrt(n)`` of the final and best test
accuracy; steps and epochs to the target test accuracy (first evaluation at or above it;
median over the runs that reached it, and how many never did; resolved by the evaluation rows
of ``metrics.jsonl``: once per epoch by default, every N steps with
``trainer.eval_every_steps=N``, whose rows carry fractional epochs); ``loss_auc``, the area under
the per-step training loss against epochs (``sum_i train_loss_i * epochs since the last
evaluation``; lower = trains faster); the generalisation gap ``final_train_acc -
final_test_acc`` (the train accuracy is the running mean over the last epoch, with
augmentation, as recorded, so the gap reads low); wall time.

Against the baseline group, on ``--metric``: Welch's t-test (``scipy.stats.ttest_ind`` with
``equal_var=False``, two-sided), Holm's step-down correction across the groups of a setting
(Holm 1979: sort the m p-values, ``p_adj(i) = max_{j<=i} min(1, (m - j + 1) p(j))``), and
Hedges' g, ``g = J (mean_A - mean_B) / s_pooled`` with ``J = 1 - 3 / (4 (n_A + n_B) - 9)``.
When neither group varies (every run the same value) the test is undefined: p is NaN (not
0) and the setting gets a "no variance" note. With each test its power: the difference's 95%
Welch interval, the pooled seed-to-seed spread, the smallest difference detectable at the
present n (alpha 0.05, 80% power, noncentral t), the seeds per arm the observed difference
would need, and with ``--effect E`` the power for E and the seeds per arm E needs. The
formulas and sources: ``meta_llr.stats``.

Figures: ``curves.png`` (test accuracy and train loss against epochs, mean and ±1 std band per
group), ``llr_heatmap.png`` (mean LLR scale per layer × progress, one panel per group),
``rotation.png`` (layer rotation against epochs per layer, one panel per group),
``curvature.png`` when the runs ran the curvature probe (``diagnostics.curvature_every``):
per layer, the exact curvature along the layer's step against the secants the controllers
estimate it with (:mod:`meta_llr.diagnostics`' columns, and ``hessian_secant``'s own estimate
from its ``secant.csv``), at the last evaluation, mean over the runs.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from meta_llr.errors import UserError
from meta_llr.runs import RunDir, find_runs
from meta_llr.stats import (NO_VARIANCE, detectable_effect, hedges_g, holm, mean_ci, pooled_sd, power_t, seeds_needed,
                            welch, welch_interval, welch_note)

METRICS = ("final_test_acc", "best_test_acc", "loss_auc", "steps_to_target", "epochs_to_target",
           "gen_gap", "wall_s", "final_train_loss", "final_test_loss")
# Config keys that may differ inside a group without splitting it.
IGNORED_KEYS = ("seed", "study", "quiet", "device", "logger", "wandb", "paths", "hydra", "arm", "replicas",
                "trainer.resume", "trainer.checkpoint", "trainer.compile", "trainer.log_every",
                "trainer.eval_batch_size", "trainer.trace_every", "trainer.divergence_factor",
                "data.root", "data.path")
NEAR_CHANCE = 0.01  # a group mean within this of chance_acc is flagged


# ----------------------------------------------------------------------------- per run

def first_reaching(metrics: list[dict], target: float, key: str = "test_acc") -> dict | None:
    """The first evaluation row whose ``key`` is at or above ``target``, or None."""
    for row in metrics:
        value = row.get(key)
        if value is not None and value >= target:
            return row
    return None


def loss_auc(metrics: list[dict]) -> float:
    """Area under the training loss against epochs: each evaluation's ``train_loss`` is the mean
    per-step loss since the previous one, so the area is ``sum_i train_loss_i * (epoch_i - epoch_{i-1})``
    (exact for the per-step curve, from epoch 0)."""
    area, last = 0.0, 0
    for row in metrics:
        if row.get("train_loss") is None:
            return math.nan
        area += row["train_loss"] * (row["epoch"] - last)
        last = row["epoch"]
    return area if metrics else math.nan


def run_values(run: RunDir, target: float | None) -> dict:
    """The per-run numbers every comparison is made of."""
    s = run.summary
    values = {k: s.get(k) for k in ("final_test_acc", "best_test_acc", "wall_s", "final_train_loss",
                                    "final_test_loss")}
    values["loss_auc"] = loss_auc(run.metrics)
    train, test = s.get("final_train_acc"), s.get("final_test_acc")
    values["gen_gap"] = train - test if train is not None and test is not None else math.nan
    hit = first_reaching(run.metrics, target) if target is not None else None
    values["steps_to_target"] = hit["step"] if hit else math.nan
    values["epochs_to_target"] = hit["epoch"] if hit else math.nan
    for key, value in s.items():  # any other numeric summary key may be a --metric
        if key not in values and isinstance(value, (int, float)) and not isinstance(value, bool):
            values[key] = value
    return {k: (math.nan if v is None else float(v)) for k, v in values.items()}


# ----------------------------------------------------------------------------- grouping

def flatten(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node if not isinstance(node, list) else tuple(node)}


# What a run directory can say (meta_llr.run writes the first five; incomplete: no summary yet,
# unreadable: a record that does not parse). Only finished runs enter means and tests.
STATUSES = ("finished", "diverged", "failed", "interrupted", "running", "incomplete", "unreadable")


def _ignored(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in IGNORED_KEYS)


@dataclass
class Group:
    label: str
    runs: list[RunDir]
    values: list[dict] = field(default_factory=list)  # finished runs only

    def counts(self) -> dict:
        """Runs per status, every one of :data:`STATUSES` (a status not among them, from a
        newer writer, counts as ``incomplete``: never silently dropped)."""
        statuses = [r.status if r.status in STATUSES else "incomplete" for r in self.runs]
        return {s: statuses.count(s) for s in STATUSES}

    def reasons(self) -> dict[str, int]:
        """Diverged runs per reason, most frequent first."""
        reasons = [r.reason for r in self.runs if r.status == "diverged"]
        return {k: reasons.count(k) for k in sorted(set(reasons), key=lambda k: (-reasons.count(k), k))}

    def describe(self) -> str:
        """``5 runs, 1 diverged (loss_explosion), 1 failed``: what the means leave out, and why."""
        text = f"{len(self.runs)} run{'s' if len(self.runs) != 1 else ''}"
        for status, count in self.counts().items():
            if status == "finished" or not count:
                continue
            text += f", {count} {status}"
            if status == "diverged":
                reasons = self.reasons()
                text += " (" + ", ".join(k if len(reasons) == 1 else f"{v} {k}" for k, v in reasons.items()) + ")"
        return text

    def chance_acc(self) -> float:
        """The runs' recorded chance accuracy (the same for one setting), NaN if none recorded."""
        values = [r.chance_acc for r in self.runs if r.chance_acc is not None]
        return float(np.mean(values)) if values else math.nan

    def near_chance(self) -> bool:
        """The finished runs' mean final test accuracy is within NEAR_CHANCE of chance (or below)."""
        accs = self.metric("final_test_acc")
        return bool(len(accs) and accs.mean() <= self.chance_acc() + NEAR_CHANCE)  # NaN chance: False

    def metric(self, key: str) -> np.ndarray:
        x = np.asarray([v.get(key, math.nan) for v in self.values], dtype=np.float64)
        return x[np.isfinite(x)]


@dataclass
class Setting:
    key: dict
    groups: dict[str, Group]
    notes: list[str] = field(default_factory=list)

    @property
    def title(self) -> str:
        title = ", ".join(f"{k}={v}" for k, v in self.key.items())
        if "jpeg" in str(self.key.get("data", "")).lower():  # the lossy CIFAR-10 copy: say so on every figure
            title += " (JPEG-compressed images: accuracy runs below the official data)"
        return title


def group_label(run: RunDir, by: str) -> str:
    if by == "controller":
        return str(run.get("arm") or run.controller)
    return str(run.get(by, "?"))


def split_settings(runs: list[RunDir], by: str, baseline: str = "") -> list[Setting]:
    """Split by setting, group by ``by``, and split groups whose configs differ."""
    by_setting: dict[tuple, list[RunDir]] = defaultdict(list)
    for run in runs:
        by_setting[tuple(sorted(run.setting.items(), key=lambda kv: kv[0]))].append(run)
    settings = []
    for key, members in by_setting.items():
        setting = Setting(dict(key), {})
        grouped: dict[str, list[RunDir]] = defaultdict(list)
        for run in members:
            grouped[group_label(run, by)].append(run)
        for label, group_runs in sorted(grouped.items(), key=lambda kv: (kv[0] != baseline, kv[0])):
            flats = [flatten(r.config) for r in group_runs]
            keys = sorted({k for f in flats for k in f if not _ignored(k) and k != by})
            differing = [k for k in keys if len({repr(f.get(k)) for f in flats}) > 1]
            if not differing:
                setting.groups[label] = Group(label, group_runs)
                continue
            setting.notes.append(f"group {label} pooled runs that differ in {', '.join(differing)}: "
                                 "split into sub-groups")
            parts: dict[str, list[RunDir]] = defaultdict(list)
            for run, flat in zip(group_runs, flats):
                parts[f"{label} [{', '.join(f'{k}={flat.get(k)}' for k in differing)}]"].append(run)
            for sub_label, sub_runs in parts.items():
                setting.groups[sub_label] = Group(sub_label, sub_runs)
        settings.append(setting)
    if len(settings) > 1:
        for setting in settings:
            setting.notes.insert(0, f"runs come from {len(settings)} different settings (data, model, epochs); "
                                    "each is compared on its own, never pooled")
    return settings


# ----------------------------------------------------------------------------- the comparison

@dataclass
class Comparison:
    settings: list[Setting]
    baseline: str
    metric: str
    target: float | None
    rows: list[dict]  # one per (setting, group): the compare.csv rows
    by: str = "controller"
    effect: float | None = None  # the difference worth finding (--effect): power and seeds for it


def default_target(runs: list[RunDir]) -> float | None:
    """The lowest per-controller mean final test accuracy: a level every group reaches on average."""
    per: dict[str, list[float]] = defaultdict(list)
    for run in runs:
        if run.status == "finished" and run.summary.get("final_test_acc") is not None:
            per[run.controller].append(run.summary["final_test_acc"])
    if not per:
        return None
    return math.floor(min(np.mean(v) for v in per.values()) * 1000) / 1000


def compare(runs: list[RunDir], baseline: str = "uniform", metric: str = "final_test_acc",
            target: float | None = None, by: str = "controller", effect: float | None = None) -> Comparison:
    if target is None:
        target = default_target(runs)
    settings = split_settings(runs, by, baseline)
    rows = []
    for setting in settings:
        for group in setting.groups.values():
            group.values = [run_values(r, target) for r in group.runs if r.status == "finished"]
        base = _baseline_group(setting, baseline)
        if base is None:
            setting.notes.append(f"no baseline group '{baseline}' in this setting: no tests "
                                 f"(groups: {', '.join(setting.groups)}; choose one with --baseline)")
        setting_rows = []
        for group in setting.groups.values():
            row = {"setting": setting.title, "group": group.label, "runs": len(group.runs), **group.counts(),
                   "diverged_reasons": ";".join(f"{k}:{v}" for k, v in group.reasons().items())}
            for key in ("final_test_acc", "best_test_acc"):
                summary = mean_ci(group.metric(key))
                row.update({f"{key}_{k}": v for k, v in summary.items() if k != "n"})
            row["chance_acc"] = group.chance_acc()
            row["near_chance"] = group.near_chance()
            reached = group.metric("steps_to_target")
            row["target_acc"] = target
            row["reached_target"] = len(reached)
            row["steps_to_target_median"] = float(np.median(reached)) if len(reached) else math.nan
            epochs = group.metric("epochs_to_target")
            row["epochs_to_target_median"] = float(np.median(epochs)) if len(epochs) else math.nan
            for key in ("loss_auc", "gen_gap", "wall_s"):
                x = group.metric(key)
                row[f"{key}_mean"] = float(x.mean()) if len(x) else math.nan
                row[f"{key}_std"] = float(x.std(ddof=1)) if len(x) > 1 else math.nan
            row["metric"] = metric
            values = group.metric(metric)
            row["metric_mean"] = float(values.mean()) if len(values) else math.nan
            if base is not None and group is not base:
                other = base.metric(metric)
                row["t"], row["p"] = welch(values, other)
                if welch_note(values, other) == NO_VARIANCE:
                    setting.notes.append(f"group {group.label} vs {base.label}, {metric}: {NO_VARIANCE}")
                row["hedges_g"] = hedges_g(values, other)
                row["diff"] = row["metric_mean"] - (float(other.mean()) if len(other) else math.nan)
                row["diff_ci_low"], row["diff_ci_high"] = welch_interval(values, other)
                n, sd = min(len(values), len(other)), pooled_sd(values, other)
                row.update(sd=sd, detectable=detectable_effect(sd, n), needs_observed=seeds_needed(abs(row["diff"]), sd),
                           power=power_t(effect, sd, n) if effect else math.nan,
                           needs=seeds_needed(effect, sd) if effect else None)
            else:
                row.update(t=math.nan, p=math.nan, hedges_g=math.nan, diff=math.nan, diff_ci_low=math.nan,
                           diff_ci_high=math.nan, sd=math.nan, detectable=math.nan, needs_observed=None,
                           power=math.nan, needs=None)
            setting_rows.append(row)
        for row, adjusted in zip(setting_rows, holm([r["p"] for r in setting_rows])):
            row["p_holm"] = adjusted
        rows.extend(setting_rows)
        for group, row in zip(setting.groups.values(), setting_rows):
            if any(v for k, v in group.counts().items() if k != "finished"):
                setting.notes.append(f"group {group.label}: {group.describe()}; only the "
                                     f"{group.counts()['finished']} finished count in means and tests")
            if row["near_chance"]:
                setting.notes.append(f"group {group.label}: mean final test accuracy {row['final_test_acc_mean']:.4f} "
                                     f"is within {NEAR_CHANCE * 100:g} point of chance ({row['chance_acc']:.4f}): "
                                     "its runs finished but learned (almost) nothing")
    return Comparison(settings, baseline, metric, target, rows, by, effect)


def _baseline_group(setting: Setting, baseline: str) -> Group | None:
    if baseline in setting.groups:
        return setting.groups[baseline]
    matches = [g for label, g in setting.groups.items() if label.split(" [")[0] == baseline]
    return matches[0] if len(matches) == 1 else None


# ----------------------------------------------------------------------------- figures

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def MaxNLocator(**kwargs):
    from matplotlib.ticker import MaxNLocator as locator
    return locator(**kwargs)


def _colors(labels):
    plt = _plt()
    cmap = plt.get_cmap("tab10")
    return {label: cmap(i % 10) for i, label in enumerate(labels)}


def plot_curves(setting: Setting, path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = _colors(setting.groups)
    for label, group in setting.groups.items():
        for ax, key in zip(axes, ("test_acc", "train_loss")):
            series = defaultdict(list)
            for run in group.runs:
                if run.status != "finished":
                    continue
                for row in run.metrics:
                    if row.get(key) is not None:
                        series[row["epoch"]].append(row[key])
            if not series:
                continue
            epochs = np.array(sorted(series))
            mean = np.array([np.mean(series[e]) for e in epochs])
            std = np.array([np.std(series[e], ddof=1) if len(series[e]) > 1 else 0.0 for e in epochs])
            n = max(len(v) for v in series.values())
            ax.plot(epochs, mean, color=colors[label], label=f"{label} (n={n})", lw=2, marker="o", ms=3)
            ax.fill_between(epochs, mean - std, mean + std, color=colors[label], alpha=0.2, lw=0)
    axes[0].set(xlabel="epoch", ylabel="test accuracy", title="Test accuracy (mean ± 1 std over seeds)")
    axes[1].set(xlabel="epoch", ylabel="train loss", title="Train loss (mean ± 1 std over seeds)")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(fontsize=9)
    fig.suptitle(setting.title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def mean_trace(runs: list[RunDir], grid: np.ndarray) -> tuple[list[str], np.ndarray] | None:
    """The groups' LLR scale per layer on a common progress grid, averaged over runs: ``[L, G]``."""
    names, stack = None, []
    for run in runs:
        trace = run.trace
        if trace is None or run.status in ("unreadable",):
            continue
        layer_names, array = trace
        if names is None:
            names = layer_names
        if layer_names != names:
            continue
        stack.append(np.stack([np.interp(grid, array[:, 1], array[:, 3 + i]) for i in range(len(names))]))
    if not stack:
        return None
    return names, np.mean(stack, axis=0)


def plot_heatmaps(setting: Setting, path: Path) -> bool:
    plt = _plt()
    grid = np.linspace(0, 1, 101)
    panels = [(label, mean_trace(group.runs, grid)) for label, group in setting.groups.items()]
    panels = [(label, t) for label, t in panels if t is not None]
    if not panels:
        return False
    vmin = min(t[1].min() for _, t in panels)
    vmax = max(t[1].max() for _, t in panels)
    if vmax - vmin < 1e-9:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    cols = 2 if len(panels) == 4 else min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    num_layers = max(len(t[0]) for _, t in panels)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols + 2.2, 1.2 + rows * max(2.4, 0.22 * num_layers)),
                             squeeze=False, layout="constrained")
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    image = None
    for index, (ax, (label, (names, values))) in enumerate(zip(axes.flat, panels)):
        image = ax.imshow(values, aspect="auto", origin="upper", cmap="viridis", vmin=vmin, vmax=vmax,
                          extent=(0, 1, len(names) - 0.5, -0.5), interpolation="nearest")
        ticks = np.unique(np.linspace(0, len(names) - 1, min(len(names), 12)).round().astype(int))
        ax.set_yticks(ticks)
        ax.set_yticklabels([names[i] for i in ticks] if index % cols == 0 else [], fontsize=7)
        ax.set_xlabel("progress (fraction of training)")
        ax.set_title(label, fontsize=10)
    fig.colorbar(image, ax=axes.ravel().tolist(), label="LLR scale (mean over runs)", shrink=0.9)
    fig.suptitle(f"LLR scale per layer (first layer on top) — {setting.title}", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_rotation(setting: Setting, path: Path) -> bool:
    plt = _plt()
    panels = []
    for label, group in setting.groups.items():
        per_layer = defaultdict(lambda: defaultdict(list))  # layer -> epoch -> values
        names = {}
        for run in group.runs:
            for row in run.layer_stats:
                if isinstance(row.get("rotation"), (int, float)):
                    per_layer[row["layer"]][row["epoch"]].append(row["rotation"])
                    names[row["layer"]] = row["name"]
        if per_layer:
            panels.append((label, per_layer, names))
    if not panels:
        return False
    cols = 2 if len(panels) == 4 else min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols + 1, 3.6 * rows), squeeze=False, sharey=True)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    cmap = plt.get_cmap("plasma")
    for ax, (label, per_layer, names) in zip(axes.flat, panels):
        count = len(per_layer)
        for layer in sorted(per_layer):
            epochs = sorted(per_layer[layer])
            ax.plot(epochs, [np.mean(per_layer[layer][e]) for e in epochs], marker="o", ms=3,
                    color=cmap(0.85 * layer / max(count - 1, 1)), lw=1.5,
                    label=names[layer] if count <= 8 or layer in (0, count - 1) else None)
        ax.set(title=label, xlabel="epoch", yscale="log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3, which="both")
    for ax in axes[:, 0]:
        ax.set_ylabel("layer rotation 1 − cos(w, w₀)")
    axes.flat[len(panels) - 1].legend(fontsize=7, title="layer (dark = first)", title_fontsize=7,
                                      loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle(f"Layer rotation (mean over runs) — {setting.title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- report

def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"
    return str(value)


def _pm(row, key) -> str:
    mean, std, low, high = (row[f"{key}_{k}"] for k in ("mean", "std", "ci_low", "ci_high"))
    if not math.isfinite(mean):
        return "—"
    text = f"{mean:.4f} ± {std:.4f}" if math.isfinite(std) else f"{mean:.4f}"
    return text + (f" [{low:.4f}, {high:.4f}]" if math.isfinite(low) else "")


CURVATURE_SERIES = (("curvature", "exact, along the layer's step (uᵀH_ll u/‖u‖²)"),
                    ("curvature_full", "exact, all layers moving (uᵀ(Hu)_l/‖u_l‖²)"),
                    ("secant_curvature", "secant along the same step and batch"),
                    ("secant_l1", "L1 secant Σ|Δg|/Σ|u| (Smith & Topin)"))


def last_curvature(run: RunDir) -> dict[str, dict[int, float]]:
    """Per series (:data:`CURVATURE_SERIES`, and ``estimate``: hessian_secant's smoothed
    curvature in ``secant.csv``), layer -> value at the run's last evaluation that has it."""
    out: dict[str, dict[int, float]] = defaultdict(dict)
    rows = [r for r in run.layer_stats if isinstance(r.get("curvature"), (int, float))]
    last = max((r["step"] for r in rows), default=None)
    for row in rows:
        if row["step"] == last:
            for key, _ in CURVATURE_SERIES:
                if isinstance(row.get(key), (int, float)) and math.isfinite(row[key]):
                    out[key][int(row["layer"])] = float(row[key])
    estimates = [r for r in run.table("secant") if isinstance(r.get("curvature"), (int, float))]
    last = max((r["step"] for r in estimates), default=None)
    for row in estimates:
        if row["step"] == last and math.isfinite(row["curvature"]):
            out["estimate"][int(row["layer"])] = float(row["curvature"])
    return out


def plot_curvature(setting: Setting, path: Path) -> bool:
    """One panel per group whose runs have the curvature probe: per layer (x), each series'
    mean over the runs (symmetric log scale: linear within ±0.01, where negative curvatures
    show), so a secant that tracks the exact curvature follows it."""
    plt = _plt()
    panels = []
    for label, group in setting.groups.items():
        series: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        for run in group.runs:
            for key, values in last_curvature(run).items():
                for layer, value in values.items():
                    series[key][layer].append(value)
        if series.get("curvature"):
            panels.append((label, series, {int(r["layer"]): r["name"] for r in group.runs[0].layer_stats}))
    if not panels:
        return False
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols + 1, 3.4 * rows), squeeze=False, sharey=True)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    names = dict(CURVATURE_SERIES, estimate="hessian_secant's estimate (secant.csv)")
    for ax, (label, series, layer_names) in zip(axes.flat, panels):
        for (key, text), style in zip(names.items(), ("o-", "s--", "^:", "v-.", "D-")):
            if series.get(key):
                layers = sorted(series[key])
                ax.plot(layers, [np.mean(series[key][l]) for l in layers], style, ms=4, lw=1.2, label=text)
        ax.set(title=label, xlabel="layer")
        ax.set_yscale("symlog", linthresh=1e-2)  # the curvature along a step can be negative
        ticks = sorted(layer_names)
        ax.set_xticks(ticks)
        ax.set_xticklabels([layer_names[t] for t in ticks], rotation=30, fontsize=7)
        ax.grid(alpha=0.3, which="both")
    for ax in axes[:, 0]:
        ax.set_ylabel("curvature at the last evaluation")
    handles = {}
    for ax in axes.flat[:len(panels)]:
        for handle, text in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(text, handle)
    axes.flat[len(panels) - 1].legend(handles.values(), handles.keys(), fontsize=7, loc="upper left",
                                      bbox_to_anchor=(1.02, 1))
    fig.suptitle(f"Exact curvature along each layer's step against its secant estimates — {setting.title}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_outputs(comparison: Comparison, out: Path, title: str = "Comparison",
                  figures: bool = True) -> dict[str, list[str]]:
    """Write compare.csv, the figures (unless ``figures=False``) and compare.md into ``out``;
    return the figure file names per setting."""
    out.mkdir(parents=True, exist_ok=True)
    header = list(comparison.rows[0]) if comparison.rows else []
    with open(out / "compare.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header, lineterminator="\n")
        writer.writeheader()
        writer.writerows(comparison.rows)
    drawn = {}
    for index, setting in enumerate(comparison.settings if figures else []):
        suffix = "" if len(comparison.settings) == 1 else f"_{index + 1}"
        names = [f"curves{suffix}.png"]
        plot_curves(setting, out / names[0])
        if plot_heatmaps(setting, out / f"llr_heatmap{suffix}.png"):
            names.append(f"llr_heatmap{suffix}.png")
        if plot_rotation(setting, out / f"rotation{suffix}.png"):
            names.append(f"rotation{suffix}.png")
        if plot_curvature(setting, out / f"curvature{suffix}.png"):
            names.append(f"curvature{suffix}.png")
        drawn[setting.title] = names
    (out / "compare.md").write_text(markdown(comparison, drawn, title))
    return drawn


def markdown(comparison: Comparison, figures: dict[str, list[str]], title: str = "Comparison") -> str:
    c = comparison
    text = io.StringIO()
    w = text.write
    total = sum(len(g.runs) for s in c.settings for g in s.groups.values())
    w(f"# {title}\n\n{total} runs in {len(c.settings)} setting(s). Groups by `{c.by}`; "
      f"baseline `{c.baseline}`; tested metric `{c.metric}`; target test accuracy "
      f"{_fmt(c.target, 3)}. Means ± sample std [95% t-interval] over finished runs; diverged, failed "
      "and incomplete runs are counted in the runs column and left out of every mean and test.\n\n")
    for setting in c.settings:
        rows = [r for r in c.rows if r["setting"] == setting.title]
        w(f"## {setting.title}\n\n")
        for note in setting.notes:
            w(f"> **Note:** {note}.\n\n")
        w("| group | runs | final test acc | best test acc | steps to target (median, reached) "
          "| epochs to target | loss AUC | gen gap | wall s |\n|---|---|---|---|---|---|---|---|---|\n")
        for r, group in zip(rows, setting.groups.values()):
            chance = f" (at chance {r['chance_acc']:.3f})" if r["near_chance"] else ""
            w(f"| {r['group']} | {group.describe()} "
              f"| {_pm(r, 'final_test_acc')}{chance} | {_pm(r, 'best_test_acc')} "
              f"| {_fmt(r['steps_to_target_median'], 0)} ({r['reached_target']}/{r['finished']}) "
              f"| {_fmt(r['epochs_to_target_median'], 1)} | {_fmt(r['loss_auc_mean'])} "
              f"| {_fmt(r['gen_gap_mean'])} | {_fmt(r['wall_s_mean'], 1)} |\n")
        effect = f"{c.effect:g}" if c.effect else None
        w(f"\nWelch t-test of `{c.metric}` against `{c.baseline}` (two-sided), Holm-corrected across "
          "groups; Hedges' g is the standardised difference (group − baseline). Power (alpha 0.05, "
          "noncentral t, the pooled seed spread sd): the smallest difference detectable with 80% power "
          "at this n, and the seeds per arm for 80% power"
          + (f" for the effect {effect} (--effect) and" if effect else "") + " for the observed difference.\n\n"
          "| group | mean | diff vs baseline [95% CI] | t | p | p (Holm) | Hedges' g | sd | detectable (80%) "
          + (f"| power for {effect} | seeds for {effect} " if effect else "") + "| seeds for the observed diff |\n"
          "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if effect else "") + "---|\n")
        for r in rows:
            w(f"| {r['group']} | {_fmt(r['metric_mean'])} | {_fmt(r['diff'])} [{_fmt(r['diff_ci_low'])}, "
              f"{_fmt(r['diff_ci_high'])}] | {_fmt(r['t'], 3)} "
              f"| {_fmt(r['p'], 3)} | {_fmt(r['p_holm'], 3)} | {_fmt(r['hedges_g'], 3)} | {_fmt(r['sd'])} "
              f"| {_fmt(r['detectable'])} "
              + (f"| {_fmt(r['power'], 2)} | {r['needs'] or '—'} " if effect else "")
              + f"| {r['needs_observed'] or '—'} |\n")
        w("\n")
        for name in figures.get(setting.title, []):
            w(f"![{name}]({name})\n\n")
    return text.getvalue()


# ----------------------------------------------------------------------------- command line

def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m meta_llr.compare", description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", nargs="+", help="run directories, or folders holding them")
    parser.add_argument("--baseline", default="uniform", help="group every other group is tested against")
    parser.add_argument("--metric", default="final_test_acc", help=f"tested metric: {', '.join(METRICS)}")
    parser.add_argument("--target-acc", type=float, default=None,
                        help="test accuracy for steps/epochs-to-target (default: the lowest group mean)")
    parser.add_argument("--by", default="controller", help="group by this summary or dotted config key")
    parser.add_argument("--out", default=None, help="output folder (default: the first RUN_DIR)")
    parser.add_argument("--effect", type=float, default=None,
                        help="the difference worth finding, in the metric's units (e.g. 0.005): power and seeds for it")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        runs = find_runs(args.run_dirs)
        if args.effect is not None and not args.effect > 0:
            raise UserError(f"--effect {args.effect}: give the difference worth finding, > 0 (e.g. 0.005)")
        comparison = compare(runs, args.baseline, args.metric, args.target_acc, args.by, args.effect)
        if args.metric not in METRICS and not any(np.isfinite(v.get(args.metric, math.nan))
                                                  for s in comparison.settings for g in s.groups.values()
                                                  for v in g.values):
            raise UserError(f"--metric {args.metric} is not in the runs; use one of {', '.join(METRICS)}")
        out = Path(args.out or args.run_dirs[0])
        write_outputs(comparison, out)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{len(runs)} runs -> {out / 'compare.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
