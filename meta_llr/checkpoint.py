"""Checkpoints of one run directory: verified, the last two kept, written durably.

A checkpoint is ``checkpoint-<step>.pt`` (``torch.save`` of ``Run.state_dict()``, which
includes the run's resolved config) with ``checkpoint-<step>.pt.sha256`` beside it
(``sha256sum`` format, so ``sha256sum -c`` checks it too). Guarantees:

* **Durable and atomic.** The bytes go to a temporary file that is fsynced, the digest is
  written (atomically) before that file is renamed into place, and the directory is fsynced
  after it: a kill at any moment leaves every ``checkpoint-*.pt`` complete or detectably
  damaged, never silently mixed. Saving removes all but the newest ``KEEP`` checkpoints,
  only after the new one is in place.
* **Verified.** :func:`load_latest` checks each checkpoint's SHA-256 (bit flips, truncation,
  zero bytes, random bytes, a broken archive) before ``torch.load``; a damaged newest one is
  reported in one line and the one before it is used; none usable is one ``UserError`` line.
* **The run its config says.** :func:`config_diff` lists the keys whose values differ
  between the checkpoint's config and the resuming run's, except :data:`meta_llr.config.FREE_KEYS`,
  which cannot change what is computed or recorded.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import sys
from pathlib import Path

import torch

from meta_llr.config import FREE_KEYS
from meta_llr.errors import UserError
from meta_llr.records import fsync_dir, write_atomic

KEEP = 2
PATTERN = re.compile(r"^checkpoint-(\d+)\.pt$")


def path_for(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"checkpoint-{step}.pt"


def digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The checkpoint files in ``run_dir``, newest (highest step) first."""
    found = []
    for path in Path(run_dir).glob("checkpoint-*.pt"):
        match = PATTERN.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found, reverse=True)]


def save(state: dict, run_dir: str | os.PathLike, step: int) -> Path:
    """Write ``state`` as ``checkpoint-<step>.pt`` with its digest; keep the newest ``KEEP``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getbuffer()
    path = path_for(Path(run_dir), step)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        write_atomic(digest_path(path), f"{hashlib.sha256(data).hexdigest()}  {path.name}\n")
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    for old in checkpoints(run_dir)[KEEP:]:
        old.unlink(missing_ok=True)
        digest_path(old).unlink(missing_ok=True)
    return path


def check(path: Path) -> str | None:
    """Why ``path`` cannot be used (missing digest, SHA-256 mismatch), or None if intact."""
    digest_file = digest_path(path)
    try:
        expected = digest_file.read_text().split()[0]
    except (OSError, IndexError, UnicodeDecodeError):
        return f"its digest {digest_file.name} is missing or unreadable"
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != expected:
        size = path.stat().st_size
        return f"SHA-256 mismatch ({size:,} bytes: truncated, overwritten or bit-flipped)"
    return None


def load_latest(run_dir: str | os.PathLike, device: torch.device) -> tuple[dict, Path, list[str]] | None:
    """The newest intact checkpoint's state, its path, and one note per newer damaged one
    (each also printed as one line on stderr); None when ``run_dir`` has no checkpoint.
    Raises a one-line UserError when checkpoints exist but none is intact."""
    found = checkpoints(run_dir)
    if not found:
        return None
    notes = []
    for path in found:
        problem = check(path)
        if problem is None:
            try:
                state = torch.load(path, map_location=device, weights_only=False)
            except Exception as error:  # intact bytes that do not load: a foreign or old file
                problem = f"does not load ({type(error).__name__}: {str(error).splitlines()[0][:80]})"
            else:
                for note in notes:
                    print(f"warning: {note}; resuming from {path.name}", file=sys.stderr)
                return state, path, notes
        notes.append(f"{path} is damaged: {problem}")
    raise UserError(f"no intact checkpoint in {run_dir}: {'; '.join(notes)}; start the run over in a new "
                    f"directory (or delete {Path(run_dir) / 'checkpoint-*'})")


def flat(tree, prefix: str = "") -> dict:
    """A nested dict as ``{"a.b.c": value}``."""
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(flat(value, f"{prefix}{key}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


def config_diff(saved: dict, current: dict) -> list[str]:
    """``key: saved -> current`` for every key outside :data:`FREE_KEYS` that differs."""
    a, b = flat(saved), flat(current)
    changed = []
    for key in sorted(set(a) | set(b)):
        if any(key == free or key.startswith(free + ".") for free in FREE_KEYS):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            changed.append(f"{key}: {a.get(key, '<absent>')} -> {b.get(key, '<absent>')}")
    return changed
