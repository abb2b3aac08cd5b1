"""``data=imagefolder``: a class-per-folder image tree with ``train/`` and ``test/`` splits, as
folders or zips (scanning, decoding with PIL in worker processes, :func:`read_imagefolder`).

Decoded once (a pool of ``workers`` processes, stored zip members read from a memory map) and
cached as ``.npz`` (:mod:`meta_llr.data.cache`): later loads cost one stat per file plus the
read of the cache. Images are ordered by class, then file name: same tree, same tensors.
"""

from __future__ import annotations

import io
import mmap
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from meta_llr.data.augment import AugmentConfig
from meta_llr.data.cache import cache_file_of, cache_root, read_cache, write_cache
from meta_llr.data.containers import DataConfig, Dataset, Split, _finish, _one_line, check_val_size
from meta_llr.errors import UserError
from meta_llr.options import opt

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderConfig", "load_imagefolder", "read_imagefolder"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass
class ImageFolderConfig(DataConfig):
    """Class-per-folder image tree with train/ and test/ splits, as folders
    (path/train/<class>/*.png|jpg) or zips with train/<class>/<file> entries.
    Decoded once with PIL and cached as .npz under root. No flip by default: a generic image
    is not assumed mirror-symmetric (data.augment.flip=true for CIFAR-like photos)."""

    name: str = opt("imagefolder", choices=("imagefolder",))
    # Required, but null by default so that the defaults pass check_section: the loader says
    # "data=imagefolder needs data.path=DIR" in one line when it is still null.
    path: Optional[str] = opt(None, free=True, doc="required: data.path=DIR (a folder or a zip)")
    channels: int = opt(3, choices=(1, 3), doc="3: RGB, 1: grayscale")
    cache: bool = opt(True, free=True, doc="cache decoded arrays as .npz (keyed by path, file sizes, mtimes)")
    root: Optional[str] = opt(None, free=True, doc="cache folder; null: $XDG_CACHE_HOME/meta_llr or ~/.cache/meta_llr")
    workers: int = opt(2, ge=0, doc="decoding processes for the first load (0 or 1: decode in this process)")
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(flip=False))


# --------------------------------------------------------------------------- #
# Scanning
# --------------------------------------------------------------------------- #

# A "source" is one image: (zip path or "" for a plain file, entry name or file path).
_Item = tuple[str, str]


def _is_image(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and base.lower().endswith(IMAGE_EXTENSIONS)


def _scan_folder(split_dir: Path) -> dict[str, list[_Item]]:
    out: dict[str, list[_Item]] = {}
    for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(str(f) for f in class_dir.iterdir() if f.is_file() and _is_image(f.name))
        if files:
            out[class_dir.name] = [("", f) for f in files]
    return out


def _scan_zip(zpath: Path) -> dict[str, dict[str, list[_Item]]]:
    """Entries ``[...]/<split>/<class>/<file>`` of a zip, grouped by split then class."""
    out: dict[str, dict[str, list[_Item]]] = {}
    with zipfile.ZipFile(zpath) as zf:
        for info in zf.infolist():
            if info.is_dir() or not _is_image(info.filename):
                continue
            parts = info.filename.split("/")
            if len(parts) < 3 or parts[-3] not in ("train", "test") or parts[0] == "__MACOSX":
                continue
            out.setdefault(parts[-3], {}).setdefault(parts[-2], []).append((str(zpath), info.filename))
    for classes in out.values():
        for items in classes.values():
            items.sort()
    return out


def _split_sources(path: Path) -> tuple[dict[str, dict[str, list[_Item]]], list[Path]]:
    """Find train/test as folders under ``path`` or in zips; returns (splits, files for the cache key)."""
    found: dict[str, dict[str, list[_Item]]] = {}
    where: dict[str, str] = {}
    as_folder: set[str] = set()
    zips: list[Path]
    if path.is_file():
        zips = [path]
    else:
        for split in ("train", "test"):
            d = path / split
            if d.is_dir():
                classes = _scan_folder(d)
                if classes:
                    found[split] = classes
                    where[split] = f"{split}/"
                    as_folder.add(split)
        zips = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".zip")
    for zp in zips:
        if all(s in found for s in ("train", "test")):
            break
        try:
            content = _scan_zip(zp)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            if zp == path:
                raise UserError(f"data.path '{path}' is a file but not a readable zip ({_one_line(exc)}); "
                                "pass a folder holding train/ and test/, or a zip of them") from None
            raise UserError(f"zip '{zp}' is damaged ({_one_line(exc)}); download or extract it again, "
                            "or remove it from data.path") from None
        for split, classes in content.items():
            if split in as_folder:
                continue  # a folder wins over a zip
            if split in found:
                raise UserError(
                    f"split '{split}' appears in both {where[split]} and {zp.name} under '{path}'; keep only one copy"
                )
            found[split] = classes
            where[split] = zp.name
    return found, zips


def _describe(path: Path) -> str:
    if path.is_file():
        return f"zip {path.name} with no train/<class>/<image> or test/<class>/<image> entries"
    try:
        entries = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    except OSError:
        entries = []
    shown = ", ".join(entries[:10]) + (", ..." if len(entries) > 10 else "")
    return shown or "an empty folder"



# --------------------------------------------------------------------------- #
# Decoding
# --------------------------------------------------------------------------- #


def _decode_one(data: bytes | str, name: str, mode: str) -> np.ndarray:
    lower = name.lower()
    formats = ["PNG"] if lower.endswith(".png") else ["JPEG"] if lower.endswith((".jpg", ".jpeg")) else None
    from PIL import Image

    src = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        im = Image.open(src, formats=formats)
    except Exception:
        if formats is None:
            raise
        if isinstance(src, io.BytesIO):
            src.seek(0)
        im = Image.open(src)  # wrong extension: let PIL sniff the format
    with im:
        if im.mode != mode:
            im = im.convert(mode)
        arr = np.asarray(im, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr


class _ZipReader:
    """Reads zip members; stored (uncompressed) members are sliced from a memory map.

    ``ZipFile.read`` costs ~50 us per member in Python overhead, a quarter of
    the decode time of a small JPEG; the fast path reads the local header and
    slices the data (CRC still checked). Anything unusual goes through ``ZipFile``.
    """

    def __init__(self, path: str):
        self.zf = zipfile.ZipFile(path)
        self._file = open(path, "rb")
        try:
            self.mm: mmap.mmap | None = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        except (ValueError, OSError):
            self.mm = None

    def read(self, name: str) -> bytes:
        info = self.zf.getinfo(name)
        if self.mm is not None and info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1:
            off = info.header_offset
            head = self.mm[off : off + 30]
            if len(head) == 30 and head[:4] == b"PK\x03\x04":
                n, m = struct.unpack("<HH", head[26:30])
                start = off + 30 + n + m
                data = self.mm[start : start + info.compress_size]
                if len(data) == info.file_size and zlib.crc32(data) == info.CRC:
                    return data
        return self.zf.read(name)

    def close(self) -> None:
        if self.mm is not None:
            self.mm.close()
        self._file.close()
        self.zf.close()


# Zips opened by this process, kept across chunks: opening a zip parses its
# whole central directory (~0.3 s for 50k entries), too slow to repeat per chunk.
_OPEN_ZIPS: dict[str, _ZipReader] = {}


def _close_zips() -> None:
    while _OPEN_ZIPS:
        _OPEN_ZIPS.popitem()[1].close()


def _worker_init() -> None:
    # A forked worker must not share the parent's zip file handles (and offsets).
    _OPEN_ZIPS.clear()


def _load_one(item: _Item, mode: str) -> np.ndarray:
    """One image as ``uint8 [H, W, C]``; a damaged zip member or an undecodable file raises a
    ValueError whose one-line message names it and the fix (pickles through the pool)."""
    zpath, name = item
    if zpath:
        try:
            zf = _OPEN_ZIPS.get(zpath)
            if zf is None:
                zf = _OPEN_ZIPS[zpath] = _ZipReader(zpath)
            data: bytes | str = zf.read(name)
        except Exception as exc:  # BadZipFile (CRC), zlib.error, EOFError, OSError ...
            raise ValueError(f"zip '{zpath}' is damaged: member {name} cannot be read ({_one_line(exc)}); "
                             "download or extract it again, or point data.path elsewhere") from None
    else:
        data = name
    try:
        return _decode_one(data, name, mode)
    except Exception as exc:
        label = f"{zpath}:{name}" if zpath else name
        raise ValueError(f"cannot decode image {label} ({_one_line(exc)}); fix or remove that file") from None


def _decode_chunk(args: tuple[list[_Item], str, tuple[int, int, int]]) -> np.ndarray:
    """Decode images of size ``shape`` (H, W, C) into ``uint8 [n, C, H, W]`` (runs in pool workers)."""
    items, mode, shape = args
    out = np.empty((len(items), shape[2], shape[0], shape[1]), dtype=np.uint8)
    for i, (zpath, name) in enumerate(items):
        arr = _load_one((zpath, name), mode)
        label = f"{zpath}:{name}" if zpath else name
        if arr.shape != shape:
            raise ValueError(
                f"image {label} is {arr.shape[1]}x{arr.shape[0]}, but the first image is {shape[1]}x{shape[0]}; "
                "all images must have one size: resize or remove that file"
            )
        out[i] = arr.transpose(2, 0, 1)
    return out


# Below this many images a process pool costs more than it saves.
_POOL_MIN_ITEMS = 2000


def _decode_all(items: list[_Item], mode: str, shape: tuple[int, int, int], workers: int) -> np.ndarray:
    if not items:
        return np.empty((0, shape[2], shape[0], shape[1]), dtype=np.uint8)
    if workers <= 1 or len(items) < _POOL_MIN_ITEMS:
        try:
            return _decode_chunk((items, mode, shape))
        finally:
            _close_zips()
    import multiprocessing as mp

    _close_zips()
    # fork is cheap (no re-import of torch), but unsafe once CUDA is initialised.
    method = "fork" if "fork" in mp.get_all_start_methods() and not torch.cuda.is_initialized() else "spawn"
    n_chunks = workers * 4
    size = -(-len(items) // n_chunks)
    chunks = [(items[i : i + size], mode, shape) for i in range(0, len(items), size)]
    with mp.get_context(method).Pool(workers, initializer=_worker_init) as pool:
        parts = pool.map(_decode_chunk, chunks, chunksize=1)
    return np.concatenate(parts)


def read_imagefolder(path: str | os.PathLike, channels: int = 3, workers: int = 2) -> tuple[Split, Split, list[str]]:
    """Decode a class-per-folder image tree with ``train`` and ``test`` splits.

    ``path`` is a folder holding ``train/<class>/<image>`` and
    ``test/<class>/<image>`` (png, jpg, ... ; non-images and hidden files are
    skipped), and/or zip files whose entries are ``[prefix/]train/<class>/<file>``
    and ``[prefix/]test/<class>/<file>`` (one zip per split or one for both;
    which is which is read from the entry names). ``path`` may also be such a
    zip file itself. A split given as a folder takes precedence over a zip.

    Classes are the sorted names of the train class folders that hold at least
    one image; labels are their indices. Test must have exactly the same
    classes. Images are ordered by class, then by file name. All images must
    have the size of the first one; ``channels`` 3 converts to RGB, 1 to
    grayscale (L). Decoding uses a pool of ``workers`` processes
    (in this process when ``workers <= 1`` or below ``_POOL_MIN_ITEMS`` images).
    A tree that breaks any of this (or a damaged zip, an undecodable image) is one
    UserError line naming the file.

    Returns ``(train, test, classes)`` with ``x`` as uint8 ``[N, C, H, W]``.
    """
    if channels not in (1, 3):  # data.channels is range-checked by ImageFolderConfig
        raise ValueError(f"read_imagefolder expects channels 1 or 3, got {channels}")
    found, classes = _scan(Path(path))
    return _decode(found, classes, channels, workers)


def _scan(path: Path) -> tuple[dict[str, dict[str, list[_Item]]], list[str]]:
    """The images of each split and class, and the classes, from file listings only (nothing decoded)."""
    if not path.exists():
        raise UserError(f"data.path '{path}' does not exist; pass data.path=DIR holding train/ and test/ folders or zips")
    try:
        found, _ = _split_sources(path)
    except OSError as exc:  # an unreadable folder
        raise UserError(f"cannot list data.path '{path}' ({_one_line(exc)}); make it readable or point data.path elsewhere") from None
    missing = [s for s in ("train", "test") if s not in found]
    if missing:
        got = ", ".join(f"{s} split" for s in found) or "no split"
        raise UserError(
            f"data.path '{path}' has no {' or '.join(missing)} images (found {got}; contents: {_describe(path)}); "
            "expected train/<class>/<image> and test/<class>/<image> as folders or zip entries"
        )
    classes = sorted(found["train"])
    test_classes = sorted(found["test"])
    if classes != test_classes:
        only_train = sorted(set(classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(classes))
        raise UserError(
            f"data.path '{path}': train and test classes differ (only in train: {only_train[:5]}, only in test: {only_test[:5]}); "
            "give both splits the same class folders"
        )
    return found, classes


def _decode(found: dict[str, dict[str, list[_Item]]], classes: list[str], channels: int, workers: int) -> tuple[Split, Split, list[str]]:
    """Decode the scanned tree (:func:`_scan`) into ``(train, test, classes)``."""
    mode = "RGB" if channels == 3 else "L"
    # Both splits go through one pool (one start-up, one zip open per worker).
    items: list[_Item] = []
    labels: dict[str, list[int]] = {"train": [], "test": []}
    for split in ("train", "test"):
        for k, cls in enumerate(classes):
            items.extend(found[split][cls])
            labels[split].extend([k] * len(found[split][cls]))
    try:
        shape = tuple(_load_one(items[0], mode).shape)  # the first train image alone gives the common size
        x = _decode_all(items, mode, shape, workers)  # [N, C, H, W]
    except ValueError as exc:
        raise UserError(_one_line(exc)) from None
    finally:
        _close_zips()
    n_train = len(labels["train"])
    splits = []
    for split, part in (("train", x[:n_train]), ("test", x[n_train:])):
        x_t = torch.from_numpy(np.ascontiguousarray(part))
        splits.append(Split(x_t, torch.tensor(labels[split], dtype=torch.int64)))
    return splits[0], splits[1], classes


# --------------------------------------------------------------------------- #
# Loader
# --------------------------------------------------------------------------- #


def load_imagefolder(cfg: ImageFolderConfig) -> Dataset:
    """Read the cache when it matches the tree, else list the tree, check ``val_size`` against
    its train images (before any decoding), decode and write the cache."""
    if cfg.path is None or str(cfg.path).strip() in ("", "???"):
        raise UserError("data=imagefolder needs data.path=DIR holding train/ and test/ class folders (or zips of them)")
    path = Path(os.path.expanduser(str(cfg.path))).absolute()
    if not path.exists():
        raise UserError(f"data.path '{path}' does not exist; pass data.path=DIR holding train/ and test/ folders or zips")
    channels, workers = int(cfg.channels), int(cfg.workers)

    cache_file = prefix = None
    if cfg.cache:
        try:
            cache_file, prefix = cache_file_of(path, channels, cache_root(cfg.root))
        except OSError:  # a file of the tree cannot be listed: _scan below names it
            cache_file = None
        cached = read_cache(cache_file) if cache_file is not None else None
        if cached is not None:
            return _finish(cfg, "imagefolder", *cached, _folder_source(path))

    found, classes = _scan(path)
    n_train = sum(len(items) for items in found["train"].values())
    check_val_size(cfg, n_train, f"{n_train} train images under data.path '{path}'")
    train, test, classes = _decode(found, classes, channels, workers)
    if cache_file is not None:
        write_cache(cache_file, prefix, train, test, classes)
    return _finish(cfg, "imagefolder", train, test, classes, _folder_source(path))


def _folder_source(path: Path) -> str:
    """The path, marked when its images are JPEG (lossy: accuracies run below the originals)."""
    names: list[str] = []
    for zpath in ([path] if path.is_file() else sorted(path.glob("*.zip"))):
        try:
            with zipfile.ZipFile(zpath) as archive:
                names += archive.namelist()[:20]
        except (zipfile.BadZipFile, OSError):  # a stray zip beside folder splits: not read for images
            pass
    if path.is_dir():
        names += [p.name for p, _ in zip(path.glob("*/*/*"), range(20))]
    lossy = any(name.lower().endswith((".jpg", ".jpeg")) for name in names)
    return f"{path} (JPEG images: lossy)" if lossy else str(path)
