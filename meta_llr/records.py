"""Run records: the files one run directory holds, always written atomically.

``config.yaml``   the fully resolved config
``env.json``      git commit, torch version, device, host, world size, data source (at the start)
``layers.csv``    the layer table: index, name, modules, params, group
``metrics.jsonl`` one JSON object per evaluation (epoch, step, train/test loss and acc, lr, wall_s)
``llr.csv``       the LLR trace: step, progress, global_lr, then one column per layer (its scale)
``train_loss.csv`` one row per log interval: step, epoch, train_loss (the interval's mean), lr
``summary.json``  written last: status (finished | diverged | failed | interrupted), with
                  ``reason`` (non_finite | loss_explosion) when diverged, accuracies, chance_acc,
                  steps, wall_s
``checkpoint-<step>.pt`` (+ ``.sha256``) the last two checkpoints (:mod:`meta_llr.checkpoint`)
``.lock``         held (``fcntl.flock``) by the one process writing the directory; holds its PID

Every write goes to a temporary file in the same directory, is fsynced and renamed over the
target, and the directory is fsynced after the rename: an interrupted run never leaves a
half-written file, and a temporary file left by a kill is removed when a run next opens the
directory. One process at a time writes a run directory: a second one gets one line naming
the holder's PID. JSON files hold strict JSON: a
non-finite number (a NaN or infinite loss) is written as ``null``, never ``NaN``/``Infinity``
(which most JSON readers reject). CSV files write such numbers as ``nan``/``inf``, which
csv readers, numpy and pandas parse as floats.
"""
from __future__ import annotations

import csv
import fcntl
import io
import json
import math
import os
import platform
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

from meta_llr.errors import UserError

SUMMARY, METRICS, TRACE, LAYERS, CONFIG, ENV, TRAIN_LOSS = (
    "summary.json", "metrics.jsonl", "llr.csv", "layers.csv", "config.yaml", "env.json", "train_loss.csv")
TRAIN_LOSS_HEADER = ("step", "epoch", "train_loss", "lr")
LOCK = ".lock"


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename inside ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_atomic(obj, path: str | os.PathLike) -> None:
    """``torch.save`` with write, fsync, rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def csv_text(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def rows_csv(rows: Sequence[Mapping], default_header: Sequence[str] = ()) -> str:
    """CSV of dict rows; the header is the union of their keys, in order of first appearance."""
    header = list(dict.fromkeys(k for row in rows for k in row)) or list(default_header)
    return csv_text(header, ([row.get(k, "") for k in header] for row in rows))


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict:
    return {
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "threads": torch.get_num_threads(),
        "host": platform.node(),
    }


class DirLock:
    """An exclusive ``fcntl.flock`` on ``directory/.lock`` (which then holds our PID), released
    by :meth:`release` or when the process ends, however it ends."""

    def __init__(self, directory: Path):
        self.handle = open(directory / LOCK, "a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "unknown"
            self.handle.close()
            raise UserError(f"{directory} is in use by another run (process {holder}); wait for it to "
                            f"end or give this run another directory") from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"{os.getpid()}\n")
        self.handle.flush()

    def release(self) -> None:
        if not self.handle.closed:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()


class RunRecords:
    """Writes one run's record files into ``out_dir``, holding its lock until :meth:`close`."""

    def __init__(self, out_dir: str | os.PathLike, write: bool = True):
        """``write=False`` (ranks other than 0 of a torchrun run): rows are kept in memory only;
        nothing is written or locked."""
        self.dir = Path(out_dir)
        self.write = write
        self.metrics: list[dict] = []
        self.trace_rows: list[list] = []
        self.trace_header: list[str] = []
        self.train_loss_rows: list[list] = []
        self.lock = None
        if not write:
            return
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.lock = DirLock(self.dir)
        except OSError as error:
            raise UserError(f"cannot write the run directory {self.dir}: {error.strerror or error}; "
                            f"choose a writable directory (hydra.run.dir=... or out_dir=...)") from None
        for stale in self.dir.glob(".*.tmp"):  # left by a kill during a write; ours, as we hold the lock
            stale.unlink(missing_ok=True)

    def write_json(self, name: str, obj: Mapping) -> None:
        self.write_text(name, dumps(obj, indent=2) + "\n")

    def write_text(self, name: str, text: str) -> None:
        if self.write:
            write_atomic(self.dir / name, text)

    def write_layers(self, rows: list[dict]) -> None:
        header = list(rows[0])
        self.write_text(LAYERS, csv_text(header, ([row[k] for k in header] for row in rows)))

    def add_metrics(self, row: Mapping) -> None:
        self.metrics.append(finite_or_none(dict(row)))
        self.write_text(METRICS, "".join(dumps(r) + "\n" for r in self.metrics))

    def add_trace(self, header: list[str], rows: list[list]) -> None:
        self.trace_header = header
        self.trace_rows.extend(rows)
        self.write_text(TRACE, csv_text(header, self.trace_rows))

    def add_train_loss(self, rows: list[list]) -> None:
        """Append ``[step, epoch, train_loss, lr]`` rows and rewrite ``train_loss.csv``."""
        self.train_loss_rows.extend(rows)
        self.write_text(TRAIN_LOSS, csv_text(TRAIN_LOSS_HEADER, self.train_loss_rows))

    def rewrite(self) -> None:
        """Make the files match the rows in memory (after a resume rolled them back) and
        remove the summary: the run is running again."""
        self.write_text(METRICS, "".join(dumps(r) + "\n" for r in self.metrics))
        if self.trace_header:
            self.write_text(TRACE, csv_text(self.trace_header, self.trace_rows))
        self.write_text(TRAIN_LOSS, csv_text(TRAIN_LOSS_HEADER, self.train_loss_rows))
        if self.write:
            (self.dir / SUMMARY).unlink(missing_ok=True)

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def state_dict(self) -> dict:
        return {"metrics": list(self.metrics), "trace_rows": list(self.trace_rows),
                "trace_header": list(self.trace_header), "train_loss_rows": list(self.train_loss_rows)}

    def load_state_dict(self, state: Mapping) -> None:
        self.metrics = list(state["metrics"])
        self.trace_rows = list(state["trace_rows"])
        self.trace_header = list(state["trace_header"])
        self.train_loss_rows = list(state.get("train_loss_rows", []))  # checkpoints before the file


def finite_or_none(obj):
    """``obj`` with every non-finite float (NaN, ±inf), at any depth, replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def dumps(obj, **kwargs) -> str:
    """Strict JSON: non-finite numbers become ``null`` (``json.dumps`` would write ``NaN``)."""
    return json.dumps(finite_or_none(obj), default=_jsonable_finite, allow_nan=False, **kwargs)


def _jsonable_finite(value):
    return finite_or_none(_jsonable(value))


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]
