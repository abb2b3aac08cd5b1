"""Experiment loggers beside the run records (which are always written).

``logger=[csv]`` (default): the run records only. ``logger=[csv,wandb]`` also logs to
Weights & Biases (config node ``wandb:``), at evaluation points only, never inside a step:

* the fully resolved config; the run's name is the run directory's name and its id a hash
  of the directory's path (``resume="allow"``: a resumed or requeued run continues the same
  W&B run); the group is the
  study (``wandb.group``), the job type the controller (``wandb.job_type``), so W&B's run
  table groups runs by study and then by controller, pooling seeds, with no manual set-up;
* per evaluation: ``epoch``, ``step``, ``train_loss``, ``train_acc``, ``test_loss``,
  ``test_acc`` (``val_*``), ``lr``, ``wall_s``;
* the LLR trace, one series per layer ``llr/<layer>`` (the scale) and ``lr/<layer>`` (the
  absolute LR, ``global_lr × scale``) plus ``global_lr`` and ``progress``, at every row of
  ``llr.csv`` (every ``trainer.trace_every`` steps), all against ``step``
  (``define_metric("llr/*", step_metric="step")``), and at the end a line-series chart
  ``llr_trace`` of every layer's scale;
* the training loss per log interval, ``train_loss_interval`` against ``step`` (the rows of
  ``train_loss.csv``, logged at each evaluation);
* per evaluation, each table the controller writes (``Controller.records()``, e.g.
  ``freezing.csv``, ``adam_probe.csv``) as a ``wandb.Table`` ``tables/<name>``;
* per-layer diagnostics ``<stat>/<layer>`` (``rotation``, ``weight_norm``, ``grad_norm``,
  ``update_ratio``, ``effective_lr``);
* the summary (status, accuracies, steps, wall time, last per-layer diagnostics).

W&B never blocks or fails a training run: with no API key the run is logged offline
(``wandb sync DIR/wandb/offline-run-*`` uploads it later); an online start that fails or
times out (``wandb.init_timeout`` seconds) falls back to offline; any other W&B error warns
once and the run continues with the csv records only.
"""
from __future__ import annotations

import hashlib
import math
import netrc
import os
import warnings
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from meta_llr.errors import UserError

LOGGERS = ("csv", "wandb")


class Logger:
    """Receives what the run records hold, at evaluation points (never inside a step)."""

    def log_evaluation(self, row: dict, trace_header: list[str], trace_rows: list[list],
                       layer_rows: list[dict], tables: dict[str, list[dict]] | None = None,
                       train_loss_rows: list[list] | None = None) -> None:
        """``row``: the metrics.jsonl row; ``trace_rows``: the llr.csv rows since the last call
        (``step, progress, global_lr, scale per layer``); ``layer_rows``: layer_stats.csv rows
        of this evaluation (none inside an epoch); ``tables``: the controller's records();
        ``train_loss_rows``: the train_loss.csv rows since the last call."""

    def finish(self, summary: dict) -> None:
        pass


def has_wandb_key() -> bool:
    """An API key in ``WANDB_API_KEY`` or in ``~/.netrc`` (what ``wandb login`` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(options: dict) -> str:
    """``wandb.mode`` if set, else ``WANDB_MODE``, else online with a key and offline without."""
    mode = options.get("mode") or os.environ.get("WANDB_MODE")
    if mode:
        if mode not in ("online", "offline", "disabled", "shared"):
            raise UserError(f"wandb.mode must be online, offline or disabled, got {mode!r}")
        return mode
    return "online" if has_wandb_key() else "offline"


class WandbLogger(Logger):
    """Logs a run to W&B; every failure degrades to a warning (the csv records stay)."""

    def __init__(self, cfg: DictConfig, out_dir: Path):
        self.run = None
        self.trace_header: list[str] = []
        self.trace_rows: list[list] = []
        options = OmegaConf.to_container(cfg.get("wandb") or {}, resolve=True)
        mode = wandb_mode(options)
        if mode == "disabled":
            return
        try:
            import wandb
        except ImportError:
            self._warn("wandb is not installed (pip install wandb)")
            return
        self.wandb = wandb
        wandb_dir = Path(options.get("dir") or os.environ.get("WANDB_DIR") or out_dir)
        wandb_dir.mkdir(parents=True, exist_ok=True)
        init = dict(
            project=options.get("project") or "meta_llr",
            entity=options.get("entity") or None,
            group=options.get("group") or str(cfg.get("study", "default")),
            job_type=options.get("job_type") or str(cfg.controller.name),
            tags=list(options.get("tags") or [cfg.controller.name, cfg.model.name, cfg.data.name]),
            name=Path(out_dir).name,
            # One W&B run per run directory: a resumed or requeued run continues the same one.
            id=hashlib.sha1(str(Path(out_dir).resolve()).encode()).hexdigest()[:16],
            resume="allow",
            dir=str(wandb_dir),
            config=OmegaConf.to_container(cfg, resolve=True),
            reinit="finish_previous",  # multirun jobs in one process: never reuse the last run
        )
        settings = dict(silent=True, console="off", init_timeout=float(options.get("init_timeout", 20)))
        try:
            self.run = wandb.init(mode=mode, settings=wandb.Settings(**settings), **init)
        except Exception as error:  # noqa: BLE001 - no network, bad key, server down: go offline
            if mode != "online":
                self._warn(f"could not start W&B ({type(error).__name__}: {error})")
                return
            try:
                self.run = wandb.init(mode="offline", settings=wandb.Settings(**settings), **init)
                warnings.warn(f"W&B online start failed ({type(error).__name__}); logging offline to "
                              f"{wandb_dir}/wandb, upload later with `wandb sync`", stacklevel=2)
            except Exception as error2:  # noqa: BLE001
                self._warn(f"could not start W&B offline either ({type(error2).__name__}: {error2})")
                return
        try:
            self.run.define_metric("step")
            for pattern in ("llr/*", "lr/*", "global_lr", "progress", "epoch", "train_*", "test_*", "val_*", "lr",
                            "wall_s", "rotation/*", "weight_norm/*", "grad_norm/*", "update_ratio/*",
                            "effective_lr/*"):
                self.run.define_metric(pattern, step_metric="step")
        except Exception as error:  # noqa: BLE001
            self._fail(error)

    def _warn(self, message: str) -> None:
        warnings.warn(f"{message}; continuing with the csv records only", stacklevel=3)

    def _fail(self, error: Exception) -> None:
        self._warn(f"W&B logging failed ({type(error).__name__}: {error})")
        run, self.run = self.run, None
        try:
            run.finish(exit_code=1)
        except Exception:  # noqa: BLE001
            pass

    def log_evaluation(self, row, trace_header, trace_rows, layer_rows, tables=None, train_loss_rows=None) -> None:
        if self.run is None:
            return
        try:
            by_step: dict[int, dict] = {}  # steps before this evaluation, logged first, in order
            if trace_rows:
                self.trace_header = list(trace_header)
                self.trace_rows.extend(trace_rows)
                names = trace_header[3:]
                for trace_row in trace_rows:
                    step, progress, global_lr, *scales = trace_row
                    entry = by_step.setdefault(step, {"step": step})
                    entry.update(progress=progress, global_lr=global_lr)
                    entry.update({f"llr/{name}": value for name, value in zip(names, scales)})
                    entry.update({f"lr/{name}": global_lr * value for name, value in zip(names, scales)})
            for step, _epoch, loss, _lr in train_loss_rows or []:
                if loss is not None and math.isfinite(loss):
                    by_step.setdefault(step, {"step": step})["train_loss_interval"] = loss
            for step in sorted(by_step):
                self.run.log(by_step[step])
            entry = {k: v for k, v in row.items() if v is not None}
            for layer_row in layer_rows:
                for key, value in layer_row.items():
                    if key not in ("epoch", "step", "layer", "name") and value is not None:
                        entry[f"{key}/{layer_row['name']}"] = value
            for name, rows in (tables or {}).items():
                if rows:
                    entry[f"tables/{name}"] = self._table(rows)
            self.run.log(entry)
        except Exception as error:  # noqa: BLE001
            self._fail(error)

    def _table(self, rows: list[dict]):
        """A controller's records() rows as a wandb.Table (columns: the union of their keys)."""
        columns = list(dict.fromkeys(k for row in rows for k in row))
        data = [[_cell(row.get(k)) for k in columns] for row in rows]
        return self.wandb.Table(columns=columns, data=data, allow_mixed_types=True)

    def finish(self, summary: dict) -> None:
        if self.run is None:
            return
        try:
            if self.trace_rows:
                names = self.trace_header[3:]
                xs = [r[0] for r in self.trace_rows]
                ys = [[r[3 + i] for r in self.trace_rows] for i in range(len(names))]
                self.run.log({"llr_trace": self.wandb.plot.line_series(
                    xs=xs, ys=ys, keys=names, title="LLR scale per layer", xname="step")})
            flat = {k: v for k, v in summary.items() if k != "layer_stats"}
            for layer, stats in (summary.get("layer_stats") or {}).items():
                flat.update({f"final_{stat}/{layer}": value for stat, value in stats.items()})
            self.run.summary.update(flat)
            self.run.finish(exit_code=0 if summary.get("status") == "finished" else 1)
        except Exception as error:  # noqa: BLE001
            self._fail(error)
        self.run = None


class Loggers(Logger):
    """Fans every call out to several loggers."""

    def __init__(self, loggers: list[Logger]):
        self.loggers = loggers

    def log_evaluation(self, *args, **kwargs) -> None:
        for logger in self.loggers:
            logger.log_evaluation(*args, **kwargs)

    def finish(self, summary: dict) -> None:
        for logger in self.loggers:
            logger.finish(summary)


def _cell(value):
    """A table cell W&B can serialise: non-finite floats as None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def make_logger(cfg: DictConfig, out_dir: Path) -> Logger:
    """The loggers ``cfg.logger`` names (checked by meta_llr.config: csv always, wandb optional)."""
    names = list(cfg.get("logger") or ["csv"])
    loggers = [WandbLogger(cfg, Path(out_dir))] if "wandb" in names else []
    return Loggers(loggers) if loggers else Logger()
