"""Experiment loggers beside the run records (which are always written).

``logger=[csv]`` (default): the run records only. Other loggers plug in here and receive
each evaluation's metrics row, the new LLR trace rows and the per-layer diagnostics.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from meta_llr.errors import UserError


class Logger:
    """Receives what the run records hold, at evaluation points (never inside a step)."""

    def log_evaluation(self, row: dict, trace_header: list[str], trace_rows: list[list],
                       layer_rows: list[dict]) -> None:
        pass

    def finish(self, summary: dict) -> None:
        pass


def make_logger(cfg: DictConfig, out_dir: Path) -> Logger:
    names = list(cfg.get("logger") or ["csv"])
    unknown = sorted(set(names) - {"csv"})
    if unknown:
        raise UserError(f"unknown logger {', '.join(unknown)}; valid: csv")
    return Logger()
