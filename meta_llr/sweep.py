"""Sweeps (``python -m meta_llr.train -m ...``) that survive their jobs.

Hydra's own sweeper stops a sweep at the first job whose config does not compose, and
re-raises a failed job's exception; a second sweep into the same directory overwrites the
first's ``multirun.yaml``. meta_llr's sweeper (``hydra/sweeper=meta_llr``, the default;
``hydra_plugins/meta_llr_sweeper``) is Hydra's basic sweeper with three changes, all here:

* every job's overrides are composed and checked (:func:`meta_llr.config.compose`) before
  the batch is launched; a job with bad input is recorded as ``failed`` with its one-line
  error and not launched, and the others run;
* grids are idempotent: a job's directory is a function of its overrides
  (:func:`meta_llr.config.run_name`) and it runs with ``trainer.resume=auto`` unless the
  command sets ``trainer.resume``; relaunching a sweep skips the jobs already finished or
  diverged (not launched at all), resumes interrupted ones from their checkpoint and reruns
  failed ones, and the summary says which was which;
* a job that fails at run time (bad data, a crash) has recorded ``failed`` in its own
  ``summary.json`` (:func:`record_failure`); one that diverges, ``diverged``; the sweep goes
  on either way; a signal (``interrupted``) stops the sweep, as the user asked;
* each sweep writes its own ``multirun-<k>.yaml`` and ``multirun-<k>-summary.json``
  (``k`` = 1, 2, ... the first free number, taken atomically), and ends with a one-screen
  summary: how many runs finished, diverged, failed or were interrupted, with their paths.

The launcher is unchanged (basic, joblib, submitit): they return each job's summary.
"""
from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path

from meta_llr.config import run_name
from meta_llr.errors import UserError
from meta_llr.records import SUMMARY, DirLock, dumps, write_atomic

STATUSES = ("finished", "diverged", "failed", "interrupted")
SHOWN = 30  # rows of the end-of-sweep summary before "... and N more"
last_counts: Counter = Counter()  # the statuses of this process's last sweep (the command's exit status)


def record_failure(run_dir: str | os.PathLike, error: str) -> None:
    """Write ``summary.json`` ``{status: failed, error}`` into ``run_dir``, unless the directory
    holds another run's summary or another process holds it (never clobber a run's records)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or (run_dir / SUMMARY).exists():
        return
    try:
        lock = DirLock(run_dir)
    except (UserError, OSError):
        return
    try:
        write_atomic(run_dir / SUMMARY, dumps({"status": "failed", "error": error}, indent=2) + "\n")
    finally:
        lock.release()


def claim_sweep_number(sweep_dir: Path) -> tuple[int, Path]:
    """The first k with no ``multirun-<k>.yaml`` in ``sweep_dir``, created empty (O_EXCL) so
    that concurrent sweeps never share a number."""
    k = 1
    while True:
        path = sweep_dir / f"multirun-{k}.yaml"
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return k, path
        except FileExistsError:
            k += 1


def sweep(sweeper, arguments: list[str]) -> list:
    """The body of ``MetaLLRSweeper.sweep`` (a ``BasicSweeper``): see the module docstring."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from meta_llr.config import compose

    params = sweeper._parse_config() + list(arguments)
    parser = OverridesParser.create(config_loader=sweeper.hydra_context.config_loader)
    sweeper.overrides = sweeper.split_arguments(parser.parse_overrides(params), sweeper.max_batch_size)
    sweep_dir = Path(sweeper.config.hydra.sweep.dir)
    try:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        number, config_path = claim_sweep_number(sweep_dir)
    except OSError as error:
        raise UserError(f"cannot write the sweep directory {sweep_dir}: {error.strerror or error}; "
                        f"choose a writable one (hydra.sweep.dir=... or paths.root=...)") from None
    OmegaConf.save(sweeper.config, config_path)
    rows, returns, job_index = [], [], 0
    try:
        while not sweeper.is_done():
            batch, launch, before = sweeper.get_job_batch(), [], []
            for job in batch:
                job = list(job)
                if not any(o.lstrip("+~").startswith("trainer.resume=") for o in job):
                    job.append("trainer.resume=auto")
                try:
                    cfg = compose(job)
                except UserError as error:
                    print(f"error: job {' '.join(job)}: {error}", file=sys.stderr)
                    rows.append({"status": "failed", "overrides": job, "error": str(error), "run_dir": None, "before": "-"})
                    continue
                run_dir = Path(os.path.abspath(sweep_dir / run_name(cfg.controller.name, cfg.model.name,
                                                                    cfg.data.name, cfg.seed, job)))
                state, summary = prior_state(run_dir)
                if state == "done":
                    rows.append({"status": summary["status"], "overrides": job, "error": summary.get("reason"),
                                 "run_dir": str(run_dir), "before": "skipped (already over)"})
                    continue
                launch.append(job)
                before.append(state)
            if launch:
                results = sweeper.launcher.launch(launch, initial_job_idx=job_index)
                returns.append(results)
                for job, result, state in zip(launch, results, before):
                    rows.append({**_row(job, result), "before": state})
            job_index += len(batch)
    except KeyboardInterrupt:  # meta_llr.errors.Interrupted: the user stopped the sweep
        rows.append({"status": "interrupted", "overrides": None, "error": "the sweep was stopped", "run_dir": None})
        raise
    finally:
        _report(rows, sweep_dir, number)
    return returns


def prior_state(run_dir: Path) -> tuple[str, dict | None]:
    """What a relaunch finds in a job's directory: ``new``, ``done`` (finished or diverged),
    ``resumed`` (interrupted, or checkpoints without a summary) or ``rerun`` (failed)."""
    from meta_llr import checkpoint

    try:
        summary = json.loads((run_dir / SUMMARY).read_text())
    except (OSError, ValueError):
        summary = None
    replicas = sorted(run_dir.glob("s*/")) if summary is None and run_dir.is_dir() else []
    if replicas:  # a replicas=S job: its runs are in s<seed>/; the job is over when they all are
        states = [prior_state(path) for path in replicas]
        if all(state == "done" for state, _ in states):
            statuses = [s["status"] for _, s in states if s["status"] != "finished"]
            return "done", {"status": statuses[0] if statuses else "finished", "replicas": [s for _, s in states]}
        return ("rerun" if any(state == "rerun" for state, _ in states) else "resumed"), None
    status = (summary or {}).get("status")
    if status in ("finished", "diverged"):
        return "done", summary
    if status == "failed":
        return "rerun", summary
    if status == "interrupted" or checkpoint.checkpoints(run_dir):
        return "resumed", summary
    return ("rerun" if run_dir.exists() and any(run_dir.glob("*.jsonl")) else "new"), summary


def _row(job, result) -> dict:
    """One job's outcome from its JobReturn (the task returns its summary with run_dir)."""
    from hydra.core.utils import JobStatus

    if result.status == JobStatus.COMPLETED and isinstance(result._return_value, dict):
        value = result._return_value
        return {"status": value.get("status", "failed"), "overrides": list(job),
                "error": value.get("error") or value.get("reason"), "run_dir": value.get("run_dir")}
    error = result._return_value
    return {"status": "failed", "overrides": list(job), "error": f"{type(error).__name__}: {error}",
            "run_dir": None}


def _report(rows: list[dict], sweep_dir: Path, number: int) -> None:
    global last_counts
    last_counts = Counter(row["status"] for row in rows)
    path = sweep_dir / f"multirun-{number}-summary.json"
    write_atomic(path, dumps({"counts": dict(last_counts), "jobs": rows}, indent=2) + "\n")
    counts = ", ".join(f"{last_counts[s]} {s}" for s in STATUSES if last_counts[s])
    befores = Counter(row["before"] for row in rows if row["before"] != "-")
    lines = [f"sweep {number} in {sweep_dir}: {len(rows)} jobs: {counts or 'none'}"
             + (f" ({', '.join(f'{n} {b}' for b, n in sorted(befores.items()))})" if befores else "")]
    shown = [row for row in rows if row["status"] != "finished"] + [row for row in rows if row["status"] == "finished"]
    for row in shown[:SHOWN]:
        where = row["run_dir"] or " ".join(row["overrides"] or [])
        note = f"  ({row['error']})" if row["error"] and row["status"] != "finished" else ""
        before = f" [{row['before']}]" if row["before"] not in ("new", "-") else ""
        lines.append(f"  {row['status']:<11} {where}{before}{note}")
    if len(shown) > SHOWN:
        lines.append(f"  ... and {len(shown) - SHOWN} more: {path}")
    print("\n".join(lines), file=sys.stderr)
