"""``python -m meta_llr.faults``: the fault suite. Prints its figures and writes
``docs/reliability.md`` (``--out``); exit status 1 if any target is missed.

What it does, on CPU, with a small real run (digits, ``mlp``, 3 epochs of 12 steps):

* **kills** (SIGKILL) at five moments, in a child process running the real command
  (``python -m meta_llr.train``) with a hook that kills it: in the first epoch (before any
  checkpoint), mid-epoch, between the records and the checkpoint of an epoch, during the
  checkpoint write, and three times in a row; each is resumed with ``trainer.resume=auto`` and
  compared bit for bit (weights, metrics without wall time, llr.csv, train_loss.csv,
  layer_stats.csv, controller tables) with an uninterrupted run. Mid-epoch kills also for
  three adaptive controllers.
* **checkpoint corruptions**: six kinds applied to the newest checkpoint of a stopped run;
  the resume must fall back to the previous one and end bit for bit equal; both damaged must
  be one line.
* **the lock**: a second process on a run directory in use gets one line naming the PID,
  and the first run's records stay its own.
* **signals**: SIGTERM, SIGINT, SIGUSR1 mid-epoch: exit status 128+N, ``interrupted``,
  resumed bit for bit.
* **bad inputs**: every typed option out of range and wrongly typed, every controller option
  out of range, damaged data, weight and curve files, and command-line cases; each must end in
  one ``UserError`` line (in-process) or one ``error:`` line with exit status 2 (command).
* **a sweep** with a job failing at compose and one failing at build: the others run, the
  summary says which, a second sweep does not overwrite the first's files.

The catalogue of bad option values (:func:`option_cases`, :data:`CONTROLLER_BAD`) is shared
with ``tests/test_options.py``.
"""
from __future__ import annotations

import argparse
import builtins
import dataclasses
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import typing
import zipfile
from pathlib import Path

BASE = ["data=digits", "model=mlp", "trainer.epochs=3", "trainer.batch_size=128", "trainer.log_every=5",
        "quiet=true", "device=cpu"]
STEPS_PER_EPOCH = 12  # ceil(1437 / 128)
TINY = ["data=synthetic", "data.channels=1", "data.size=8", "data.classes=4", "data.train_size=64",
        "data.test_size=32", "model=mlp", "model.hidden=16", "trainer.epochs=1", "trainer.batch_size=16",
        "quiet=true", "trainer.checkpoint=false", "device=cpu"]

# Controller options checked by each controller's __init__: one out-of-range value each
# (options absent here are flags). tests/test_options.py checks the table is complete.
CONTROLLER_BAD = {
    ("cascade_onecycle", "peak_at"): "[1.5]", ("cascade_onecycle", "peak"): "[-1.0]",
    ("cascade_onecycle", "start"): "-1", ("cascade_onecycle", "end"): "-1", ("cascade_onecycle", "anneal"): "zzz",
    ("depth_cyclic", "low"): "-1", ("depth_cyclic", "high"): "0.1", ("depth_cyclic", "max_cycles"): "0",
    ("depth_cyclic", "min_cycles"): "0",
    ("depth_linear", "first"): "-1", ("depth_linear", "last"): "-1",
    ("discriminative", "factor"): "0",
    ("fixed_linear", "start"): "[-1.0]", ("fixed_linear", "end"): "[-1.0]", ("fixed_linear", "t0"): "[1.5]",
    ("fixed_linear", "t1"): "[-0.5]",
    ("freezeout", "t0"): "0", ("freezeout", "spacing"): "zzz",
    ("llrd", "decay"): "0",
    ("replay", "curve"): "/nonexistent/curve.json", ("replay", "match"): "zzz",
    ("soft_freeze", "high"): "0.01", ("soft_freeze", "low"): "-1", ("soft_freeze", "half_life"): "[0.0]",
    ("unfreeze", "every"): "0", ("unfreeze", "direction"): "zzz",
    ("adam_probe", "beta1"): "1", ("adam_probe", "beta2"): "1", ("adam_probe", "eps"): "0", ("adam_probe", "ema"): "0",
    ("adam_probe", "probe_every"): "-1", ("adam_probe", "quantiles"): "[1.5]", ("adam_probe", "min_scale"): "0",
    ("adam_probe", "max_scale"): "0.001",
    ("hessian_secant", "interval"): "0", ("hessian_secant", "ema"): "0", ("hessian_secant", "form"): "zzz",
    ("hessian_secant", "gain"): "0", ("hessian_secant", "min_scale"): "0", ("hessian_secant", "max_scale"): "0.001",
    ("hessian_secant", "power"): "-1", ("hessian_secant", "blocks"): "zzz", ("hessian_secant", "min_update_ratio"): "1",
    ("hypergrad", "rule"): "zzz", ("hypergrad", "beta"): "-1", ("hypergrad", "min_scale"): "0",
    ("hypergrad", "max_scale"): "0.001",
    ("lars", "trust"): "0", ("lars", "wd"): "-1", ("lars", "min_scale"): "0", ("lars", "max_scale"): "0.00001",
    ("lamb", "min_scale"): "0", ("lamb", "max_scale"): "0.0001",
    ("layca", "alpha"): "1", ("layca", "other_params"): "zzz", ("layca", "min_scale"): "0",
    ("layca", "max_scale"): "0.0001",
    ("prodigy_layer", "mode"): "zzz", ("prodigy_layer", "d0"): "0", ("prodigy_layer", "gamma"): "0",
    ("prodigy_layer", "beta3"): "1.5", ("prodigy_layer", "beta2"): "1", ("prodigy_layer", "min_scale"): "0",
    ("prodigy_layer", "max_scale"): "0.01",
    ("rnn_meta", "learn"): "zzz", ("rnn_meta", "weights"): "/nonexistent/weights.pt", ("rnn_meta", "hidden"): "0",
    ("rnn_meta", "min_scale"): "0", ("rnn_meta", "max_scale"): "0.01", ("rnn_meta", "every"): "0",
    ("rnn_meta", "horizon"): "0", ("rnn_meta", "meta_lr"): "-1", ("rnn_meta", "unroll"): "0",
    ("rnn_meta", "meta_every"): "0", ("rnn_meta", "feature_decay"): "1", ("rnn_meta", "baseline"): "[-1.0]",
    ("rnn_meta", "seed"): "-1", ("rnn_meta", "baseline_curve"): "/nonexistent/curve.json",
    ("width_scaled", "base_fan_in"): "0", ("width_scaled", "column"): "zzz",
}


# ----------------------------------------------------------------------------- bad values

def wrong_type(kind) -> str | None:
    """A value OmegaConf must refuse for a field of this type."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    inner = args[0] if typing.get_origin(kind) is typing.Union and args else kind
    base = typing.get_origin(inner) or inner
    if base in (int, float, bool, list):
        return "abc"
    if base is str:
        return "[1,2]"
    return None


def out_of_range(bounds) -> str | None:
    """A value outside a :class:`meta_llr.options.Range`, or None when it is free."""
    if bounds is None or bounds.free:
        return None
    if bounds.choices is not None:
        value = "zzz" if all(isinstance(c, str) for c in bounds.choices) else "7"
    elif bounds.ge is not None:
        value = f"{bounds.ge - 1:g}"
    elif bounds.gt is not None:
        value = f"{bounds.gt:g}"
    elif bounds.le is not None:
        value = f"{bounds.le + 1:g}"
    elif bounds.lt is not None:
        value = f"{bounds.lt:g}"
    else:
        value = "inf" if bounds.finite else None
    if bounds.length is not None and value is not None:
        return f"[{value}]" if bounds.length[0] <= 1 else "[" + ",".join([value] * bounds.length[0]) + "]"
    return value


def option_cases():
    """``(selection overrides, key, dataclass, field name, type)`` for every declared option of
    the root config and of every model, data source and schedule."""
    from meta_llr.config import Config
    from meta_llr.data import SOURCES
    from meta_llr.models import MODEL_CONFIGS
    from meta_llr.registry import available
    from meta_llr.schedules import SCHEDULES

    available()

    def walk(cls, prefix, select):
        for f in dataclasses.fields(cls):
            if f.name == "name" or f.type is typing.Any or f.type == "Any":
                continue
            kind = typing.get_type_hints(cls)[f.name]
            key = f"{prefix}.{f.name}" if prefix else f.name
            if dataclasses.is_dataclass(kind):
                yield from walk(kind, key, select)
            else:
                yield select, key, cls, f.name, kind

    yield from walk(Config, "", [])
    for group, configs in (("model", MODEL_CONFIGS), ("data", SOURCES), ("schedule", SCHEDULES)):
        for name, cls in configs.items():
            yield from walk(cls, group, [f"{group}={name}"])


def controller_cases():
    """``(controller, option, type)`` for every option of every registered controller."""
    from meta_llr.registry import CONTROLLER_CONFIGS, available

    return [(name, f.name, f.type) for name, cls in CONTROLLER_CONFIGS.items() if name in available()
            for f in dataclasses.fields(cls) if f.name != "name"]


def bad_option_inputs(workdir: Path) -> list[tuple[str, list[str]]]:
    """(label, overrides) of every bad option value: ranges and types of every typed option,
    every controller option out of range and wrongly typed, and a few values no range covers."""
    from meta_llr.registry import available

    cases = []
    for select, key, cls, name, kind in option_cases():
        bounds = next(f for f in dataclasses.fields(cls) if f.name == name).metadata.get("range")
        bad = out_of_range(bounds)
        if bad is not None:
            cases.append((f"{key} out of range", [*select, f"{key}={bad}"]))
        wrong = wrong_type(kind)
        if wrong is not None and not (bounds is not None and bounds.free and str in (kind, *typing.get_args(kind))):
            cases.append((f"{key} wrong type", [*select, f"{key}={wrong}"]))
    for name, option, kind in controller_cases():
        select = [f"controller={name}"]
        if name == "replay" and option != "curve":
            select += [f"controller.{k}={v}" for k, v in available()[name].example_options(workdir).items()]
        if (name, option) in CONTROLLER_BAD:
            cases.append((f"controller.{option} ({name}) out of range",
                          [*select, f"controller.{option}={CONTROLLER_BAD[name, option]}"]))
        wrong = wrong_type(kind)
        if wrong is not None and typing.Optional[str] != kind:
            cases.append((f"controller.{option} ({name}) wrong type", [*select, f"controller.{option}={wrong}"]))
    cases += [("unknown controller", ["controller=nope"]), ("unknown model", ["model=nope"]),
              ("unknown data", ["data=nope"]), ("unknown schedule", ["schedule=nope"]),
              ("unknown option", ["trainer.lrr=0.1"]), ("unknown controller option", ["controller.nope=1"]),
              ("trainer.resume not a mode", ["trainer.resume=maybe"]),
              ("layers.groups above the layer count", [*TINY, "layers.groups=1000"]),
              ("device not visible", [*TINY, "device=cuda:7"])]
    return cases


# ----------------------------------------------------------------------------- bad files

def _png(value: int = 40, size=(4, 4)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, (value, value, value)).save(buffer, format="PNG")
    return buffer.getvalue()


def _tree(root: Path, classes=("a", "b"), n: int = 3) -> Path:
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (root / split / c / f"{i}.png").write_bytes(_png(40 * i + (100 if c == "b" else 0)))
    return root


def _zip_tree(path: Path, compression=zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for split in ("train", "test"):
            for c in ("a", "b"):
                for i in range(3):
                    archive.writestr(f"{split}/{c}/{i}.png", _png(40 * i + (100 if c == "b" else 0)))
    return path


def damage_zip_member(path: Path, member: str) -> None:
    """Flip ten bytes of ``member``'s data inside the zip ``path`` (its headers stay intact)."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
    raw = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    for k in range(start + 2, start + min(info.compress_size, 12)):
        raw[k] ^= 0xFF
    path.write_bytes(bytes(raw))


def bad_file_inputs(root: Path) -> list[tuple[str, list[str]]]:
    """(label, overrides) for damaged or wrong data, weight and curve files, made under ``root``."""
    import torch

    from controllers.rnn_meta import RNNMeta

    cases = []

    def folder(name: str) -> Path:
        path = root / name
        path.mkdir(parents=True)
        return path

    def image_folder(label, path, *extra):
        cases.append((label, [*TINY, "data=imagefolder", f"data.path={path}", "data.cache=false", *extra]))

    d = folder("zip_deflated"); damage_zip_member(_zip_tree(d / "all.zip"), "test/b/0.png")
    image_folder("zip with a damaged member (deflated)", d)
    image_folder("zip with a damaged member, path is the zip", d / "all.zip")
    d = folder("zip_stored"); damage_zip_member(_zip_tree(d / "all.zip", zipfile.ZIP_STORED), "test/b/0.png")
    image_folder("zip with a damaged member (stored: CRC)", d)
    d = folder("zip_first"); damage_zip_member(_zip_tree(d / "all.zip"), "train/a/0.png")
    image_folder("zip with a damaged first member", d)
    d = folder("zip_truncated"); z = _zip_tree(d / "all.zip"); z.write_bytes(z.read_bytes()[:100])
    image_folder("truncated zip", d)
    d = folder("not_zip"); (d / "weights.pt").write_bytes(bytes(range(256)))
    image_folder("data.path is a non-zip file", d / "weights.pt")
    d = folder("torch_file"); torch.save({"w": torch.zeros(2)}, d / "model.pt")
    image_folder("data.path is a torch file (a zip without images)", d / "model.pt")
    d = folder("zip_no_images"); zipfile.ZipFile(d / "notes.zip", "w").writestr("readme.txt", "hi")
    image_folder("zip without images", d)
    image_folder("empty folder", folder("empty"))
    d = folder("text_only")
    for split in ("train", "test"):
        (d / split / "a").mkdir(parents=True)
        (d / split / "a" / "notes.txt").write_text("x")
    image_folder("folder of non-image files", d)
    image_folder("data.path missing", root / "missing")
    d = _tree(folder("bad_png")); (d / "train/b/1.png").write_bytes(b"not a png")
    image_folder("corrupt PNG in the tree", d)
    d = _tree(folder("bad_jpeg")); (d / "train/b/1.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    image_folder("corrupt JPEG in the tree", d)
    d = _tree(folder("truncated_png")); (d / "train/b/1.png").write_bytes(_png(size=(16, 16))[:40])
    image_folder("truncated PNG in the tree", d)
    d = _tree(folder("empty_image")); (d / "train/a/0.png").write_bytes(b"")
    image_folder("empty image file", d)
    d = _tree(folder("sizes"))
    from PIL import Image
    Image.new("RGB", (7, 7)).save(d / "test/a/9.png")
    image_folder("image of another size", d)
    image_folder("a single class", _tree(folder("one_class"), classes=("a",)))
    image_folder("data.val_size >= the train images", _tree(folder("val_size")), "data.val_size=6")
    cases.append(("data.root is a file (cifar10)", ["data=cifar10", f"data.root={d / 'train/a/0.png'}", "data.download=false"]))

    d = folder("weights")
    good = RNNMeta().weights_dict()
    (d / "text.pt").write_text("these are not weights\n")
    (d / "random.pt").write_bytes(bytes(range(256)) * 4)
    torch.save(torch.zeros(3), d / "tensor.pt")
    torch.save({**good, "format": "other/1"}, d / "format.pt")
    torch.save({**good, "params": {"gru.weight": torch.zeros(3)}}, d / "keys.pt")
    torch.save({**good, "params": RNNMeta(hidden=8).weights_dict()["params"]}, d / "shapes.pt")
    torch.save({k: v for k, v in good.items() if k != "hidden"}, d / "no_hidden.pt")
    torch.save({**good, "params": {k: torch.full_like(v, float("nan")) for k, v in good["params"].items()}}, d / "nan.pt")
    for name in ("text", "random", "tensor", "format", "keys", "shapes", "no_hidden", "nan", "missing"):
        cases.append((f"rnn_meta weights: {name}", ["controller=rnn_meta", "controller.learn=off",
                                                    f"controller.weights={d / (name + '.pt')}"]))
    header = "step,progress,global_lr,l0,l1,l2\n"
    for name, text in {"empty": "", "word": header + "0,0.0,0.1,1,one,1\n", "nan": header + "0,0.0,0.1,1,nan,1\n",
                       "short row": header + "0,0.0,0.1,1\n", "too few columns": "step,progress,global_lr,l0\n0,0,0.1,1\n"}.items():
        path = d / f"{name.replace(' ', '_')}.csv"
        path.write_text(text)
        cases.append((f"rnn_meta baseline_curve: {name}", [*TINY, "controller=rnn_meta",
                                                           f"controller.baseline_curve={path}"]))
    d = folder("curves")
    fmt = "meta_llr.curve/1"
    layer = lambda **kw: {"name": "a", "knots": [0.0], "values": [1.0], **kw}  # noqa: E731
    curves = {"not JSON": "{not json", "binary": bytes(range(128, 256)),
              "no layers": json.dumps({"format": fmt, "curves": []}),
              "other format": json.dumps({"format": "other/1", "layers": [layer()]}),
              "misspelt keys": json.dumps({"format": fmt, "layers": [{"name": "a", "knot": [0.0], "value": [1.0]}]}),
              "NaN value": '{"format": "%s", "layers": [{"name": "a", "knots": [0, 1], "values": [1, NaN]}]}' % fmt,
              "negative value": json.dumps({"format": fmt, "layers": [layer(values=[-1.0])]}),
              "infinite knot": '{"format": "%s", "layers": [{"name": "a", "knots": [0, Infinity], "values": [1, 1]}]}' % fmt,
              "decreasing knots": json.dumps({"format": fmt, "layers": [layer(knots=[0.5, 0.0], values=[1.0, 1.0])]}),
              "depth out of range": json.dumps({"format": fmt, "layers": [layer(depth=2)]}),
              "too few layers": json.dumps({"format": fmt, "layers": [layer(name=n) for n in ("a", "b")]})}
    for name, content in curves.items():
        path = d / f"{name.replace(' ', '_')}.json"
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
        cases.append((f"replay curve: {name}", [*TINY, "controller=replay", f"controller.curve={path}"]))
    (d / "folder.json").mkdir()
    cases.append(("replay curve: a folder", [*TINY, "controller=replay", f"controller.curve={d / 'folder.json'}"]))
    return cases


def attempt(overrides: list[str], out: Path) -> tuple[str, str]:
    """Compose, build and train ``overrides`` in-process: ``("rejected", line)`` for a one-line
    UserError, ``("multi-line", msg)``, ``("traceback", msg)`` or ``("accepted", "")``."""
    import warnings

    from meta_llr.config import compose
    from meta_llr.errors import UserError
    from meta_llr.run import train

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train(compose(overrides), out)
    except UserError as error:
        text = str(error)
        return ("rejected" if "\n" not in text and text else "multi-line"), text
    except Exception as error:
        return "traceback", f"{type(error).__name__}: {error}"
    return "accepted", ""


def command_cases(root: Path) -> list[tuple[str, list[str]]]:
    """(label, argv) for ``python -m meta_llr.train``: each must exit 2 with one ``error:`` line."""
    a_file = root / "a_file"
    a_file.write_text("x")
    held = root / "held"
    return [("malformed override", ["trainer.lr=[1,"]), ("override without a key", ["=3"]),
            ("run dir is a file", [f"hydra.run.dir={a_file}"]),
            ("run dir under a file", [f"hydra.run.dir={a_file}/run"]),
            ("unknown controller", ["controller=nope"]), ("-m with --cfg", ["-m", "seed=0,1", "--cfg", "job"]),
            ("resume=true with nothing to resume", [*TINY, f"hydra.run.dir={held}", "trainer.resume=true"])]


# ----------------------------------------------------------------------------- runs in a child

def child(spec: dict) -> None:
    """Run the command ``python -m meta_llr.train ARGV`` with one fault hook (this process)."""
    from meta_llr import checkpoint, train
    from meta_llr.run import Run

    hook, at = spec.get("hook"), spec.get("at")
    kill = lambda: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731
    if hook in ("kill_after_step", "signal_after_step", "wait_after_step"):
        step = Run.train_step

        def train_step(self, x, y):
            step(self, x, y)
            if self.step == at:
                if hook == "kill_after_step":
                    kill()
                elif hook == "signal_after_step":
                    os.kill(os.getpid(), spec["signal"])
                else:  # hold the run directory until the parent says go
                    go = Path(spec["go"])
                    deadline = time.time() + 120
                    while not go.exists() and time.time() < deadline:
                        time.sleep(0.05)
        Run.train_step = train_step
    elif hook == "kill_after_records":
        evaluate = Run.log_evaluation

        def log_evaluation(self, wall):
            row = evaluate(self, wall)
            if self.epoch == at:
                kill()
            return row
        Run.log_evaluation = log_evaluation
    elif hook == "kill_in_checkpoint_write":
        saves = []

        class HalfWrite:
            def __init__(self, path, mode):
                self.file = builtins.open(path, mode)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.file.close()

            def write(self, data):
                self.file.write(bytes(data[:len(data) // 2]))
                self.file.flush()
                kill()

        def open_for_checkpoint(path, mode="r", *args, **kwargs):
            saves.append(path)
            if len(saves) == at:
                return HalfWrite(path, mode)
            return builtins.open(path, mode, *args, **kwargs)
        checkpoint.open = open_for_checkpoint
    sys.argv = ["meta_llr.train", *spec["argv"]]
    train.main()


def run_child(spec: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meta_llr.faults", "--child", json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "WANDB_MODE": "disabled"})


def command(argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meta_llr.train", *argv], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "WANDB_MODE": "disabled"})


# ----------------------------------------------------------------------------- comparison

def differences(a: Path, b: Path) -> list[str]:
    """What differs between two run directories' records and final weights ([] = bit for bit)."""
    import torch

    from meta_llr import checkpoint
    from meta_llr.records import read_jsonl

    out = []
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]  # noqa: E731
    if strip(read_jsonl(a / "metrics.jsonl")) != strip(read_jsonl(b / "metrics.jsonl")):
        out.append("metrics.jsonl")
    tables = {p.name for p in a.glob("*.csv")} | {p.name for p in b.glob("*.csv")}
    for name in sorted(tables):
        if not ((a / name).exists() and (b / name).exists()) or (a / name).read_text() != (b / name).read_text():
            out.append(name)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    for key in ("status", "final_test_acc", "steps", "final_train_loss"):
        if sa.get(key) != sb.get(key):
            out.append(f"summary.{key}")
    wa, wb = (torch.load(checkpoint.checkpoints(d)[0], weights_only=False)["model"] for d in (a, b))
    if any(not torch.equal(wa[k], wb[k]) for k in wa):
        out.append("weights")
    return out


def mixed(diff: list[str]) -> bool:
    return any(d.endswith((".csv", ".jsonl")) for d in diff)


# ----------------------------------------------------------------------------- the suite

class Suite:
    def __init__(self, root: Path):
        self.root = root
        self.sections: dict[str, list[dict]] = {}

    def add(self, section: str, case: str, ok: bool, detail: str = "", outcome: str = "", mixed: bool = False) -> None:
        """One case; ``outcome`` for bad inputs, ``mixed`` when a run's record files differ."""
        self.sections.setdefault(section, []).append({"case": case, "ok": ok, "detail": detail,
                                                      "outcome": outcome, "mixed": mixed})
        mark = "ok  " if ok else "FAIL"
        print(f"  {mark} {section}: {case}{'  — ' + detail if detail else ''}", file=sys.stderr, flush=True)

    def reference(self, controller: str) -> Path:
        from meta_llr.config import compose
        from meta_llr.run import train

        out = self.root / f"reference-{controller}"
        if not out.exists():
            train(compose([*BASE, f"controller={controller}"]), out)
        return out

    def resume_in_process(self, out: Path, controller: str) -> dict:
        from meta_llr.config import compose
        from meta_llr.run import train

        return train(compose([*BASE, f"controller={controller}", "trainer.resume=auto"]), out)

    def kills(self) -> None:
        spe = STEPS_PER_EPOCH
        scenarios = [("in the first epoch", "uniform", [{"hook": "kill_after_step", "at": 5}]),
                     ("mid-epoch", "uniform", [{"hook": "kill_after_step", "at": spe + 6}]),
                     ("between the records and the checkpoint", "uniform", [{"hook": "kill_after_records", "at": 2}]),
                     ("during the checkpoint write", "uniform", [{"hook": "kill_in_checkpoint_write", "at": 2}]),
                     ("three times in a row", "uniform", [{"hook": "kill_after_step", "at": 5},
                                                          {"hook": "kill_after_step", "at": spe + 8},
                                                          {"hook": "kill_in_checkpoint_write", "at": 2}])]
        scenarios += [(f"mid-epoch, {c}", c, [{"hook": "kill_after_step", "at": spe + 6}])
                      for c in ("hessian_secant", "adam_probe", "rnn_meta")]
        for k, (name, controller, hooks) in enumerate(scenarios):
            out = self.root / f"kill-{k}"
            argv = [*BASE, f"controller={controller}", f"hydra.run.dir={out}", "trainer.resume=auto"]
            codes = [run_child({**hook, "argv": argv}).returncode for hook in hooks]
            leftovers = sorted(p.name for p in out.glob(".*.tmp"))
            summary = self.resume_in_process(out, controller)
            diff = differences(out, self.reference(controller))
            killed = all(code == -signal.SIGKILL for code in codes)
            tmp_note = f"; left {leftovers} removed on resume" if leftovers and not list(out.glob(".*.tmp")) else ""
            self.add("kills", name, killed and summary["status"] == "finished" and not diff,
                     f"exit {codes}, resumed: {summary['status']}, "
                     f"{'bit for bit' if not diff else 'differs: ' + ', '.join(diff)}{tmp_note}", mixed=mixed(diff))

    def corruptions(self) -> None:
        import random

        from meta_llr import checkpoint
        from meta_llr.errors import UserError

        reference = self.reference("uniform")

        def corrupt(kind: str, path: Path) -> None:
            data = bytearray(path.read_bytes())
            rng = random.Random(0)
            if kind == "truncated to half":
                path.write_bytes(bytes(data[:len(data) // 2]))
            elif kind == "zero bytes":
                path.write_bytes(b"")
            elif kind == "random bytes":
                path.write_bytes(rng.randbytes(len(data)))
            elif kind == "broken archive (central directory overwritten)":
                path.write_bytes(bytes(data[:-100]) + bytes(100))
            elif kind == "64 bytes flipped inside the weights":
                for i in rng.sample(range(len(data) // 4, 3 * len(data) // 4), 64):
                    data[i] ^= 0xFF
                path.write_bytes(bytes(data))
            elif kind == "digest file missing":
                checkpoint.digest_path(path).unlink()

        kinds = ["truncated to half", "zero bytes", "random bytes", "broken archive (central directory overwritten)",
                 "64 bytes flipped inside the weights", "digest file missing"]
        for k, kind in enumerate(kinds):
            out = self.root / f"corrupt-{k}"
            shutil.copytree(reference, out)
            (out / "summary.json").unlink()  # a run stopped after its last checkpoint
            newest, previous = checkpoint.checkpoints(out)[:2]
            corrupt(kind, newest)
            summary = self.resume_in_process(out, "uniform")
            diff = differences(out, reference)
            fell_back = summary.get("resumes", [{}])[0].get("checkpoint") == previous.name
            self.add("corruptions", kind, fell_back and not diff,
                     f"detected, resumed from {previous.name}; {'bit for bit' if not diff else 'differs: ' + ', '.join(diff)}",
                     mixed=mixed(diff))
        out = self.root / "corrupt-both"
        shutil.copytree(reference, out)
        (out / "summary.json").unlink()
        for path in checkpoint.checkpoints(out):
            corrupt("64 bytes flipped inside the weights", path)
        try:
            self.resume_in_process(out, "uniform")
            self.add("corruptions", "both checkpoints damaged", False, "accepted")
        except UserError as error:
            self.add("corruptions", "both checkpoints damaged", "\n" not in str(error), f"one line: {str(error)[:90]}...")

    def lock(self) -> None:
        from meta_llr.config import compose
        from meta_llr.errors import UserError
        from meta_llr.run import train

        out, go = self.root / "lock", self.root / "lock-go"
        argv = [*BASE, "controller=uniform", f"hydra.run.dir={out}"]
        first = subprocess.Popen([sys.executable, "-m", "meta_llr.faults", "--child",
                                  json.dumps({"hook": "wait_after_step", "at": 3, "go": str(go), "argv": argv})],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, "WANDB_MODE": "disabled"})
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "metrics.jsonl").exists() and \
                not ((out / ".lock").exists() and (out / ".lock").read_text().strip() == str(first.pid)):
            time.sleep(0.05)
        refused = ""
        for resume in ("false", "auto"):
            try:
                train(compose([*BASE, "controller=uniform", f"trainer.resume={resume}"]), out)
                refused = "accepted"
            except UserError as error:
                if str(first.pid) not in str(error) and not refused:
                    refused = f"wrong message: {error}"
        go.touch()
        first.communicate(timeout=300)
        diff = differences(out, self.reference("uniform"))
        self.add("lock", "a second process on a run directory in use", not refused and first.returncode == 0 and not diff,
                 f"refused in one line naming PID {first.pid} (resume=false and auto); the first run finished "
                 f"{'bit for bit' if not diff else 'differing: ' + ', '.join(diff)}" if not refused else refused,
                 mixed=mixed(diff))

    def signals(self) -> None:
        for number in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            out = self.root / f"signal-{number.name}"
            argv = [*BASE, "controller=uniform", f"hydra.run.dir={out}", "trainer.resume=auto"]
            done = run_child({"hook": "signal_after_step", "at": STEPS_PER_EPOCH + 6, "signal": int(number), "argv": argv})
            saved = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
            summary = self.resume_in_process(out, "uniform")
            diff = differences(out, self.reference("uniform"))
            ok = (done.returncode == 128 + number and saved.get("status") == "interrupted"
                  and saved.get("steps") == STEPS_PER_EPOCH + 6 and summary["status"] == "finished" and not diff)
            self.add("signals", number.name, ok, f"exit {done.returncode}, recorded {saved.get('status')} at step "
                     f"{saved.get('steps')}, resumed {'bit for bit' if not diff else 'differing: ' + ', '.join(diff)}",
                     mixed=mixed(diff))

    def bad_inputs(self) -> None:
        work = self.root / "inputs"
        work.mkdir()
        cases = bad_option_inputs(work) + bad_file_inputs(work / "files")
        for k, (label, overrides) in enumerate(cases):
            outcome, text = attempt(overrides, work / f"run-{k}")
            self.add("bad inputs", label, outcome == "rejected", text if outcome != "rejected" else "", outcome)
        for label, argv in command_cases(work):
            done = command(argv)
            lines = done.stderr.strip().splitlines()
            ok = done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ")
            outcome = ("rejected" if ok else "traceback" if "Traceback" in done.stderr
                       else "accepted" if done.returncode == 0 else "multi-line")
            self.add("bad inputs", f"command: {label}", ok, "" if ok else f"exit {done.returncode}: {done.stderr[-200:]}",
                     outcome)

    def sweep(self) -> None:
        argv = ["-m", *TINY, "trainer.lr=0.05,-1", "layers.groups=0,1000", f"paths.root={self.root / 'sweeps'}",
                "study=s", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
        first = command(argv)
        report = self.root / "sweeps/s/multirun-1-summary.json"
        counts = json.loads(report.read_text())["counts"] if report.exists() else {}
        second = command(argv)
        kept = (self.root / "sweeps/s/multirun-1.yaml").exists() and (self.root / "sweeps/s/multirun-2.yaml").exists()
        ok = first.returncode == 1 and counts == {"failed": 3, "finished": 1} and second.returncode == 1 and kept
        self.add("sweep", "a 4-job sweep with 2 jobs failing at compose and 1 at build", ok,
                 f"exit {first.returncode}, {counts}; a second sweep wrote multirun-2.yaml beside multirun-1.yaml")


def report(suite: Suite, wall: float) -> tuple[str, bool]:
    s = suite.sections
    count = lambda name: (sum(c["ok"] for c in s.get(name, [])), len(s.get(name, [])))  # noqa: E731
    bad = s.get("bad inputs", [])
    outcomes = {k: sum(1 for c in bad if c["outcome"] == k) for k in ("rejected", "traceback", "multi-line", "accepted")}
    runs = s.get("kills", []) + s.get("signals", []) + s.get("corruptions", [])[:-1] + s.get("lock", [])
    lost = sum(1 for c in runs if not c["ok"])
    figures = {
        "bad inputs tried": len(bad), "rejected in one line": outcomes["rejected"],
        "tracebacks": outcomes["traceback"], "multi-line messages": outcomes["multi-line"],
        "silently accepted": outcomes["accepted"],
        "kills resumed bit for bit": "%d of %d" % count("kills"),
        "corrupt checkpoints detected and recovered or refused in one line": "%d of %d" % count("corruptions"),
        "signals resumed bit for bit": "%d of %d" % count("signals"),
        "lock": "%d of %d" % count("lock"), "sweep": "%d of %d" % count("sweep"),
        "runs lost (not finished bit for bit after the fault)": lost,
        "records mixed (a record file differing from the uninterrupted run's)": sum(c["mixed"] for c in runs),
    }
    passed = all(c["ok"] for cases in s.values() for c in cases) and len(bad) >= 150
    lines = ["# Reliability: what meta_llr guarantees, and the fault suite that checks it", "",
             "Generated by `python -m meta_llr.faults` (CPU; "
             f"{wall:.0f} s on the machine that wrote it). Every figure below is from that run.", "",
             "## Figures", "", "| figure | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in figures.items()]
    lines += ["", GUARANTEES, ""]
    for section, cases in s.items():
        lines += [f"## {section} ({sum(c['ok'] for c in cases)} of {len(cases)} ok)", ""]
        if section == "bad inputs":
            lines += ["Each must end in one `UserError` line (in-process: compose, build and train on a tiny",
                      "config) or, for the command, exit status 2 with one `error:` line. Cases passing: "
                      f"{count(section)[0]} of {len(cases)}." + (" Failing:" if count(section)[0] < len(cases) else ""), ""]
            lines += [f"- {c['case']}: {c['detail']}" for c in cases if not c["ok"]]
            lines += ["", "<details><summary>every case</summary>", ""] + [f"- {c['case']}" for c in cases] + ["", "</details>"]
        else:
            lines += ["| case | ok | what happened |", "|---|---|---|"]
            lines += [f"| {c['case']} | {'yes' if c['ok'] else '**no**'} | {c['detail']} |" for c in cases]
        lines.append("")
    return "\n".join(lines), passed


GUARANTEES = """## Guarantees, and how each is tested

| guarantee | how it is kept | tested by |
|---|---|---|
| A record file is complete or absent, never half-written | every write goes to a temporary file, is fsynced and renamed; the directory is fsynced; temporary files left by a kill are removed when a run opens the directory | kills during the checkpoint write (here); `tests/test_reliability.py` |
| A resumed run is the run its config says | the checkpoint holds the resolved config; a resume differing in any key but `quiet`, `logger`, `wandb`, `paths`, `hydra`, `device`, `trainer.resume`, `trainer.checkpoint` is refused in one line listing the keys, and so is a resume whose `trainer.precision=auto` resolves otherwise (fp32 on a CPU, bf16 on CUDA) | `tests/test_reliability.py` |
| A resume continues bit for bit | the checkpoint holds every piece of state (weights, optimizer, controller, RNG streams, position in the epoch, accumulators, records); checkpoints at epoch ends and at the step boundary after a signal | kills at five moments and three signals (here), compared with an uninterrupted run: weights, metrics, llr.csv, train_loss.csv, layer_stats.csv |
| A damaged checkpoint is never loaded | `checkpoint-<step>.pt` with its SHA-256 beside it, checked before loading; the last two kept; a damaged newest one is reported in one line and the previous one used, records rolled back to it; none intact is one line | six corruptions (here) |
| One process per run directory | `fcntl.flock` on `.lock` (holding the PID) for the run's life; released by the kernel when the process dies | the lock case (here); `tests/test_reliability.py` |
| A signal loses nothing | SIGTERM, SIGINT, SIGUSR1: checkpoint at the next step boundary, `status: interrupted`, exit status 128+N; a second signal stops at once (the last checkpoint stays) | three signals (here) |
| `trainer.resume` | `false` (default) refuses a directory that holds a run; `true` refuses one that does not; `auto` continues a run, returns a finished or diverged one's summary, starts one otherwise | `tests/test_reliability.py` |
| A run that blows up is `diverged`, never `finished` | the training loss is checked at every log point and epoch end (the open interval too): non-finite, or above `trainer.divergence_factor` × min(first interval's mean, ln classes), so a blow-up inside the first interval cannot raise its own bar | `tests/test_failures.py` |
| Replicas fail or stop one by one | a replica that diverges stops its records while the others train on (its row takes an active replica's batch); a resumed group leaves a replica that is over as it is; an error in one replica's step or records is recorded as `failed` by every replica still training | `tests/test_replicas.py` |
| A sweep survives its jobs | meta_llr's Hydra sweeper: bad jobs recorded and skipped, run-time failures recorded in their `summary.json`, the rest run; one summary per sweep; `multirun-<k>.yaml` never overwritten | the sweep case (here); `tests/test_reliability.py` |
| Bad input is one line | typed options with declared ranges, file checks in the loaders; the command prints `error: ...` and exits 2 | the bad inputs (here); `tests/test_options.py`, `tests/test_data.py` |
| Random valid and invalid inputs end as a run or one line | — | `tests/test_reliability.py` (hypothesis; `HYPOTHESIS_PROFILE=faults` for 300 examples) |"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meta_llr.faults", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/reliability.md", help="the document to write ('-': print only)")
    parser.add_argument("--only", default="", help="comma-separated sections: kills,corruptions,lock,signals,inputs,sweep")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    os.environ.setdefault("WANDB_MODE", "disabled")
    started = time.perf_counter()
    chosen = [s for s in args.only.split(",") if s] or ["kills", "corruptions", "lock", "signals", "inputs", "sweep"]
    with tempfile.TemporaryDirectory(prefix="meta_llr_faults_") as tmp:
        suite = Suite(Path(tmp))
        steps = {"kills": suite.kills, "corruptions": suite.corruptions, "lock": suite.lock,
                 "signals": suite.signals, "inputs": suite.bad_inputs, "sweep": suite.sweep}
        for name in chosen:
            print(f"{name} ...", file=sys.stderr, flush=True)
            steps[name]()
        text, passed = report(suite, time.perf_counter() - started)
    if args.out != "-" and not args.only:
        Path(args.out).write_text(text + "\n")
    print(text.split("\n## Guarantees")[0])
    print("all targets met" if passed else "TARGETS MISSED", file=sys.stderr)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
