"""Read run directories back (the records ``meta_llr.train`` writes; see ``meta_llr.records``).

``find_runs(paths)`` accepts run directories and folders holding them (a study, a sweep),
at any depth, and returns one :class:`RunDir` per run. A run without ``summary.json`` (killed,
still running) is kept with status ``incomplete``; a file that cannot be parsed makes the
run ``unreadable`` (with the reason), never an exception: a report counts such runs.
A ``diverged`` run says why in ``reason`` (``non_finite``, ``loss_explosion``; ``unknown``
for records written before the reason was recorded, when only non-finite losses were
detected).
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import yaml

from meta_llr.errors import UserError
from meta_llr.records import CONFIG, ENV, LAYERS, METRICS, SUMMARY, TRACE, TRAIN_LOSS

LAYER_STATS = "layer_stats.csv"


@dataclass
class RunDir:
    path: Path
    summary: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    problem: str | None = None  # why the run could not be read, if it could not

    @property
    def status(self) -> str:
        if self.problem:
            return "unreadable"
        return self.summary.get("status", "incomplete")

    @property
    def reason(self) -> str | None:
        """Why a diverged run diverged; None for any other status."""
        if self.status != "diverged":
            return None
        return str(self.summary.get("reason") or "unknown")

    @property
    def chance_acc(self) -> float | None:
        """The test accuracy of always answering the majority class (summary.json), if recorded."""
        value = self.summary.get("chance_acc")
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    @property
    def name(self) -> str:
        return self.path.name

    def get(self, key: str, default=None):
        """A summary key, else a dotted config key (``trainer.lr``, ``controller.first``)."""
        if key in self.summary:
            return self.summary[key]
        node = self.config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    @property
    def controller(self) -> str:
        return self.summary.get("controller") or self.get("controller.name", "?")

    @property
    def setting(self) -> dict:
        """What must match for runs to be pooled: data, model (with its options), epochs."""
        model = self.config.get("model") or {"name": self.summary.get("model")}
        options = ", ".join(f"{k}={v}" for k, v in sorted(model.items()) if k != "name")
        data = self.summary.get("data") or self.get("data.name")
        path = self.get("data.path")
        if path:  # two image folders are two datasets: never pool them
            data = f"{data}({Path(str(path)).name})"
        if "JPEG" in str(self.summary.get("data_source") or self.env.get("data_source", "")):
            data += "[JPEG]"  # env.json has it from the start: a running run joins its setting
        return {"data": data,
                "model": f"{model.get('name')}({options})" if options else model.get("name"),
                "epochs": self.get("trainer.epochs")}

    @cached_property
    def env(self) -> dict:
        """``env.json`` (written when the run starts), {} if absent or unreadable."""
        try:
            value = json.loads((self.path / ENV).read_text())
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    @cached_property
    def metrics(self) -> list[dict]:
        path = self.path / METRICS
        if not path.exists():
            return []
        rows = []
        with open(path) as handle:
            for line in handle:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a torn last line of a killed run
        return rows

    @cached_property
    def trace(self) -> tuple[list[str], np.ndarray] | None:
        """``(layer names, [T, 3 + L] array of step, progress, global_lr, scales)`` or None."""
        return _read_csv_array(self.path / TRACE)

    @cached_property
    def train_loss(self) -> list[dict]:
        """``train_loss.csv`` rows (step, epoch, train_loss, lr); [] for older records."""
        return _read_rows(self.path / TRAIN_LOSS)

    @cached_property
    def layer_stats(self) -> list[dict]:
        return _read_rows(self.path / LAYER_STATS)

    @cached_property
    def layers(self) -> list[dict]:
        return _read_rows(self.path / LAYERS)

    def table(self, name: str) -> list[dict]:
        """A controller's table ``<name>.csv`` (``Controller.records``); [] when absent."""
        return _read_rows(self.path / f"{name}.csv")


def _read_rows(path: Path) -> list[dict]:
    """A CSV file's rows as dicts with numbers parsed; [] when the file is absent."""
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def _number(text: str):
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def _read_csv_array(path: Path):
    if not path.exists():
        return None
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        rows = [[float(v) for v in row] for row in reader if row]
    if header is None or not rows:
        return None
    return header[3:], np.asarray(rows, dtype=np.float64)


def read_run(path: str | os.PathLike) -> RunDir:
    run = RunDir(Path(path))
    try:
        if (run.path / SUMMARY).exists():
            run.summary = json.loads((run.path / SUMMARY).read_text())
        if (run.path / CONFIG).exists():
            run.config = yaml.safe_load((run.path / CONFIG).read_text()) or {}
        if not isinstance(run.summary, dict) or not isinstance(run.config, dict):
            raise ValueError("not a mapping")
    except (OSError, ValueError, yaml.YAMLError) as error:
        run.problem = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return run


def is_run_dir(path: Path) -> bool:
    return (path / SUMMARY).exists() or ((path / CONFIG).exists() and (path / METRICS).exists())


def find_runs(paths) -> list[RunDir]:
    """Every run directory in or under ``paths``, sorted by path; UserError if there is none."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found: dict[Path, RunDir] = {}
    for given in paths:
        root = Path(given)
        if not root.is_dir():
            raise UserError(f"{root} is not a directory; give run directories or a folder holding them "
                            "(e.g. runs/<study>)")
        candidates = [root] if is_run_dir(root) else sorted(
            {p.parent for name in (SUMMARY, METRICS) for p in root.rglob(name)
             if not any(part.startswith(".") for part in p.relative_to(root).parts)})
        for path in candidates:
            if is_run_dir(path):
                found[path.resolve()] = read_run(path)
    if not found:
        raise UserError(f"no run directories (with summary.json) under {', '.join(map(str, paths))}; "
                        "train some first, e.g. python -m meta_llr.train hydra.run.dir=runs/x/a")
    return [found[p] for p in sorted(found)]
