"""The on-disk cache: :func:`default_cache_dir` (CIFAR archives, imagefolder caches) and the
imagefolder ``.npz`` cache of decoded arrays.

A cache file is keyed by the absolute path, ``channels`` and the size+mtime of every input file
(a stat per file, no reads), written atomically, and replaces older caches of the same folder;
an unreadable cache is ignored with a warning and rebuilt.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from meta_llr.data.containers import Split, _one_line

__all__ = ["default_cache_dir"]

# Bump when the layout of the imagefolder cache file changes.
_CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/meta_llr`` or ``~/.cache/meta_llr``."""
    base = os.environ.get("XDG_CACHE_HOME")
    if base:
        return Path(base) / "meta_llr"
    return Path.home() / ".cache" / "meta_llr"


def cache_root(root: str | None) -> Path:
    """``data.root`` (``~`` expanded), or :func:`default_cache_dir` when it is null or empty."""
    return Path(os.path.expanduser(str(root))) if root else default_cache_dir()


def _cache_key(path: Path, channels: int) -> str:
    """Hash of the absolute path, channels and the size+mtime of every input file."""
    h = hashlib.sha256()
    h.update(json.dumps({"v": _CACHE_VERSION, "path": str(path), "channels": channels}).encode())
    stamp = []
    if path.is_file():
        st = path.stat()
        stamp.append((path.name, st.st_size, st.st_mtime_ns))
    else:
        for p in sorted(path.iterdir()):
            if p.is_file() and p.suffix.lower() == ".zip":
                st = p.stat()
                stamp.append((p.name, st.st_size, st.st_mtime_ns))
        for split in ("train", "test"):
            d = path / split
            if d.is_dir():
                for dirpath, dirnames, filenames in os.walk(d):
                    dirnames.sort()
                    for fn in sorted(filenames):
                        st = os.stat(os.path.join(dirpath, fn))
                        stamp.append((os.path.relpath(os.path.join(dirpath, fn), path), st.st_size, st.st_mtime_ns))
    for item in stamp:
        h.update(repr(item).encode())
        h.update(b"\n")
    return h.hexdigest()


def cache_file_of(path: Path, channels: int, root: Path) -> tuple[Path, str]:
    """``(cache file, prefix shared by every cache of this folder)`` for the image tree ``path``."""
    key = _cache_key(path, channels)
    # <folder name>-<hash of the path>-<hash of path, channels, sizes, mtimes>.npz
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.name or "root")[:40]
    prefix = f"{slug}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}-"
    return root / "imagefolder" / f"{prefix}{key[:20]}.npz", prefix


def read_cache(cache_file: Path) -> tuple[Split, Split, list[str]] | None:
    """``(train, test, classes)`` from ``cache_file``, as :func:`write_cache` wrote them; None when
    absent, unreadable or not of that layout (warned: the caller rebuilds it)."""
    if not cache_file.is_file():
        return None
    try:
        with np.load(cache_file, allow_pickle=False) as z:
            train = Split(torch.from_numpy(z["train_x"]), torch.from_numpy(z["train_y"]))
            test = Split(torch.from_numpy(z["test_x"]), torch.from_numpy(z["test_y"]))
            classes = [str(c) for c in z["classes"]]
        for split in (train, test):
            if split.x.dtype != torch.uint8 or split.x.dim() != 4 or split.y.dtype != torch.int64 \
                    or split.y.shape != split.x.shape[:1] or split.x.shape[1:] != train.x.shape[1:] \
                    or (len(split) and not 0 <= int(split.y.min()) <= int(split.y.max()) < len(classes)):
                raise ValueError("arrays of the wrong dtype, shape or labels")
        return train, test, classes
    except Exception as exc:  # corrupt or foreign file: rebuild it
        warnings.warn(f"ignoring unreadable cache {cache_file} ({_one_line(exc)}); rebuilding it", stacklevel=3)
        return None


def write_cache(cache_file: Path, prefix: str, train: Split, test: Split, classes: list[str]) -> None:
    """Write atomically (temp file + rename), then remove older caches of the same folder;
    an unwritable cache folder only warns."""
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(cache_file.name + f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            np.savez(
                f,
                train_x=train.x.numpy(),
                train_y=train.y.numpy(),
                test_x=test.x.numpy(),
                test_y=test.y.numpy(),
                classes=np.array(classes, dtype=np.str_),
            )
        os.replace(tmp, cache_file)
        # Caches of older versions of the same folder are stale: remove them.
        for old in cache_file.parent.glob(f"{glob.escape(prefix)}*.npz"):
            if old != cache_file:
                old.unlink(missing_ok=True)
    except OSError as exc:
        warnings.warn(f"could not write the image cache {cache_file}: {_one_line(exc)}", stacklevel=3)
