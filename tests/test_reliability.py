"""Reliability: the resume config check and ``trainer.resume``, signals (checkpoint,
``interrupted``, exit code, exact resume), damaged checkpoints (fallback with a warning, exact
records), the run-directory lock, sweeps that survive their jobs, and a property test: any mix
of valid and invalid input ends as complete records or one ``UserError`` line.

Every comparison is exact: weights with ``torch.equal``, metrics rows without ``wall_s``, the
CSV files as text. The property test is derandomized (the same examples every run); run more
of them with ``HYPOTHESIS_PROFILE=faults python -m pytest -q tests/test_reliability.py``.
"""
import csv
import io
import json
import os
import random
import shutil
import signal
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import event, given, settings, strategies as st

from meta_llr import checkpoint
from meta_llr.config import compose
from meta_llr.errors import Interrupted, UserError
from meta_llr.faults import damage_zip_member
from meta_llr.records import CONFIG, LAYERS, LOCK, METRICS, SUMMARY, TRACE, TRAIN_LOSS, read_jsonl
from meta_llr.run import SIGNALS, Run, build_run, resume_if_asked, train
from tests.conftest import TINY, compose_config

ROOT = Path(__file__).resolve().parent.parent
STEPS_PER_EPOCH = 4  # TINY: 64 training images, batches of 16

settings.register_profile("reliability", max_examples=25, deadline=None, derandomize=True, database=None)
settings.register_profile("faults", parent=settings.get_profile("reliability"), max_examples=300)
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "reliability"))


# --------------------------------------------------------------------------- helpers
def config(*overrides, epochs=2):
    return compose_config(*TINY, "trainer.checkpoint=true", f"trainer.epochs={epochs}", *overrides)


def weights(run: Run) -> dict:
    return {k: v.detach().clone() for k, v in run.model.state_dict().items()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"weights differ: {key}"


def records(run_dir) -> dict:
    """What a run wrote, minus what legitimately differs between runs (times, resume notes)."""
    d = Path(run_dir)
    summary = json.loads((d / SUMMARY).read_text())
    resolved = yaml.safe_load((d / CONFIG).read_text())
    del resolved["trainer"]["resume"], resolved["trainer"]["checkpoint"]  # free keys: how it was started
    return {
        "summary": {k: v for k, v in summary.items() if k not in ("wall_s", "resumes")},
        "metrics": [{k: v for k, v in row.items() if k != "wall_s"} for row in read_jsonl(d / METRICS)],
        "config": resolved,
        **{name: (d / name).read_text() for name in (TRACE, TRAIN_LOSS, "layer_stats.csv", LAYERS)},
    }


def interrupt_after(run: Run, step: int, sig: int) -> None:
    """Make ``run`` send itself ``sig`` right after its step ``step`` (counted from 1)."""
    original = run.train_step

    def train_step(x, y):
        original(x, y)
        if run.step == step:
            os.kill(os.getpid(), sig)
            assert run.stop_signal == sig  # delivered and handled before os.kill returned

    run.train_step = train_step


def interrupted_run(cfg, run_dir, step: int, sig: int = signal.SIGTERM) -> Interrupted:
    run = build_run(cfg, run_dir)
    assert resume_if_asked(run) is None
    interrupt_after(run, step, sig)
    with pytest.raises(Interrupted) as stop:
        run.fit()
    return stop.value


def resume(cfg, run_dir, rolled_back: tuple[dict, int] | None = None) -> tuple[dict, Run]:
    """Continue (or return) the run in ``run_dir`` as a new process would: a fresh build_run.
    ``rolled_back=(straight records, step)``: before training on, check that the run is at
    ``step`` and its files hold exactly the straight run's records up to it."""
    run = build_run(cfg, run_dir)
    done = resume_if_asked(run)
    if done is not None:
        return done, run
    if rolled_back is not None:
        assert run.step == rolled_back[1]
        assert_rolled_back(run_dir, *rolled_back)
    return run.fit(), run


def assert_rolled_back(run_dir, straight_records: dict, step: int) -> None:
    """The files are the straight run's as of its last evaluation at or before ``step`` (they
    are written at evaluations; the checkpoint holds the rows written so far)."""
    d = Path(run_dir)
    assert not (d / SUMMARY).exists()  # running again
    evaluated = step // STEPS_PER_EPOCH * STEPS_PER_EPOCH  # TINY evaluates at the end of each epoch
    metrics = [{k: v for k, v in row.items() if k != "wall_s"} for row in read_jsonl(d / METRICS)]
    assert metrics == [row for row in straight_records["metrics"] if row["step"] <= evaluated]
    for name, last in ((TRACE, evaluated - 1), (TRAIN_LOSS, evaluated)):  # llr.csv: step index; train_loss: steps done
        header, *rows = straight_records[name].splitlines(keepends=True)
        assert (d / name).read_text() == header + "".join(r for r in rows if int(r.split(",")[0]) <= last), name


def one_line(error: BaseException) -> str:
    message = str(error)
    assert message.strip() and "\n" not in message, repr(message)
    return message


def changed_keys(message: str) -> set[str]:
    """The keys a config-mismatch refusal lists (``... (where): k: a -> b; k2: c -> d; resume with ...``)."""
    listed = message.split("): ", 1)[1].split("; resume with", 1)[0]
    return {item.split(": ", 1)[0] for item in listed.split("; ")}


def handlers() -> dict:
    return {number: signal.getsignal(number) for number in SIGNALS}


# --------------------------------------------------------------------------- shared runs
@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Uninterrupted runs of 2 and 3 epochs: their records and final weights."""
    out = {}
    for epochs in (2, 3):
        run_dir = tmp_path_factory.mktemp(f"straight{epochs}") / "run"
        summary, run = resume(config(epochs=epochs), run_dir)
        assert summary["status"] == "finished" and summary["steps"] == epochs * STEPS_PER_EPOCH
        out[epochs] = {"dir": run_dir, "records": records(run_dir), "weights": weights(run)}
    return out


@pytest.fixture(scope="module")
def interrupted2(tmp_path_factory):
    """A 2-epoch run stopped by SIGTERM after step 6 (mid epoch 2): checkpoints 4 and 6."""
    run_dir = tmp_path_factory.mktemp("interrupted2") / "run"
    interrupted_run(config(), run_dir, 6)
    assert [p.name for p in checkpoint.checkpoints(run_dir)] == ["checkpoint-6.pt", "checkpoint-4.pt"]
    return run_dir


@pytest.fixture(scope="module")
def interrupted3(tmp_path_factory):
    """A 3-epoch run stopped by SIGTERM after step 10 (mid epoch 3): checkpoints 8 and 10 (4 pruned)."""
    run_dir = tmp_path_factory.mktemp("interrupted3") / "run"
    interrupted_run(config(epochs=3), run_dir, 10)
    assert [p.name for p in checkpoint.checkpoints(run_dir)] == ["checkpoint-10.pt", "checkpoint-8.pt"]
    assert not (run_dir / "checkpoint-4.pt.sha256").exists()
    return run_dir


def copy(run_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run_dir, target)
    return target


# --------------------------------------------------------------------------- 1. resume config check
@pytest.mark.parametrize("base", ["interrupted", "finished"])
@pytest.mark.parametrize("overrides,keys", [
    (["seed=1"], {"seed"}),
    (["trainer.lr=0.1"], {"trainer.lr"}),
    (["seed=1", "trainer.lr=0.1"], {"seed", "trainer.lr"}),
    (["trainer.epochs=3"], {"trainer.epochs"}),  # other tensor shapes: refused before loading anything
])
def test_resume_with_another_config_is_refused_naming_the_keys(base, overrides, keys, straight, interrupted2,
                                                               tmp_path):
    run_dir = copy(interrupted2 if base == "interrupted" else straight[2]["dir"], tmp_path)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.name != LOCK}
    run = build_run(config("trainer.resume=auto", *overrides), run_dir)
    with pytest.raises(UserError) as refused:
        resume_if_asked(run)
    message = one_line(refused.value)
    assert "holds a run with another config" in message
    assert changed_keys(message) == keys, message
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.name != LOCK} == before  # nothing touched
    build_run(config(), run_dir).close()  # the refusal released the directory


def test_resume_may_change_free_keys_and_continues_exactly(straight, interrupted2, tmp_path):
    run_dir = copy(interrupted2, tmp_path)
    summary, run = resume(config("trainer.resume=auto", "quiet=false"), run_dir, (straight[2]["records"], 6))
    assert summary["status"] == "finished"
    assert summary["resumes"] == [{"from_step": 6, "checkpoint": "checkpoint-6.pt"}]
    assert records(run_dir) == straight[2]["records"]
    assert_same_weights(weights(run), straight[2]["weights"])


def test_resume_in_another_precision_is_refused(interrupted2, tmp_path):
    """device is a free key, but trainer.precision=auto resolves by device (bf16 on CUDA): a run
    that trained in fp32 on the CPU does not silently continue in bf16 (here a CUDA resume is
    stood in for by the resolved precision)."""
    run_dir = copy(interrupted2, tmp_path)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.name != LOCK}
    run = build_run(config("trainer.resume=auto"), run_dir)
    run.precision = "bf16"
    with pytest.raises(UserError) as refused:
        resume_if_asked(run)
    assert "trained in fp32 and would continue in bf16" in one_line(refused.value)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.name != LOCK} == before  # nothing touched


def test_resume_modes_on_empty_and_occupied_directories(straight, tmp_path):
    with pytest.raises(UserError) as refused:  # true: nothing to continue
        resume(config("trainer.resume=true"), tmp_path / "empty")
    assert "trainer.resume=true" in one_line(refused.value) and "holds no run" in str(refused.value)

    run_dir = copy(straight[2]["dir"], tmp_path)
    with pytest.raises(UserError) as refused:  # false (the default): a run is there
        resume(config(), run_dir)
    assert "already holds a run" in one_line(refused.value)

    summary, run = resume(config("trainer.resume=auto"), tmp_path / "auto")  # auto, empty: trains
    assert summary["status"] == "finished" and "resumes" not in summary
    assert records(tmp_path / "auto") == straight[2]["records"]
    assert_same_weights(weights(run), straight[2]["weights"])


def test_auto_on_a_finished_run_returns_its_summary_without_training(straight, tmp_path, monkeypatch):
    run_dir = copy(straight[2]["dir"], tmp_path)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.name != LOCK}

    def no_training(self):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(Run, "fit", no_training)
    for mode in ("auto", "true"):
        summary = train(config(f"trainer.resume={mode}", "quiet=false"), run_dir)
        assert summary == json.loads((run_dir / SUMMARY).read_text())
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.name != LOCK} == before


def test_auto_without_a_checkpoint_starts_over(straight, tmp_path):
    """Records but no checkpoint (trainer.checkpoint=false, killed: no summary): true refuses,
    auto starts over and ends with exactly a straight run's records."""
    run_dir = tmp_path / "run"
    first, _ = resume(config("trainer.checkpoint=false"), run_dir)
    assert first["status"] == "finished" and not checkpoint.checkpoints(run_dir)
    (run_dir / SUMMARY).unlink()  # as a SIGKILL before the end would leave it
    with pytest.raises(UserError) as refused:
        resume(config("trainer.checkpoint=false", "trainer.resume=true"), run_dir)
    assert "no checkpoint" in one_line(refused.value)
    summary, run = resume(config("trainer.checkpoint=false", "trainer.resume=auto"), run_dir)
    assert summary["status"] == "finished" and "resumes" not in summary
    assert records(run_dir) == straight[2]["records"]
    assert_same_weights(weights(run), straight[2]["weights"])


def test_starting_over_leaves_nothing_of_the_old_attempt(tmp_path):
    """Killed again before its first evaluation, a run started over must not hold the old trace."""
    run_dir = tmp_path / "run"
    resume(config("trainer.checkpoint=false"), run_dir)
    (run_dir / SUMMARY).unlink()
    run = build_run(config("trainer.checkpoint=false", "trainer.resume=auto"), run_dir)
    assert resume_if_asked(run) is None and run.step == 0
    run.close()
    assert read_jsonl(run_dir / METRICS) == []
    assert not (run_dir / TRACE).exists() or len((run_dir / TRACE).read_text().splitlines()) <= 1
    assert not (run_dir / "layer_stats.csv").exists()


# --------------------------------------------------------------------------- 2. signals
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1], ids=lambda s: s.name)
def test_signal_checkpoints_records_interrupted_and_resumes_exactly(sig, straight, tmp_path):
    before = handlers()
    run_dir = tmp_path / "run"
    stop = interrupted_run(config(), run_dir, 6, sig)
    assert handlers() == before  # restored after fit, though it ended by raising
    assert isinstance(stop, KeyboardInterrupt)
    assert (stop.signum, stop.exit_code) == (sig, 128 + sig)
    summary = json.loads((run_dir / SUMMARY).read_text())
    assert (summary["status"], summary["error"], summary["steps"]) == ("interrupted", sig.name, 6)
    assert [p.name for p in checkpoint.checkpoints(run_dir)] == ["checkpoint-6.pt", "checkpoint-4.pt"]
    assert all(checkpoint.check(p) is None for p in checkpoint.checkpoints(run_dir))
    assert not list(run_dir.glob(".*.tmp"))

    summary, run = resume(config("trainer.resume=auto"), run_dir, (straight[2]["records"], 6))
    assert handlers() == before
    assert summary["status"] == "finished" and "error" not in summary
    assert summary["resumes"] == [{"from_step": 6, "checkpoint": "checkpoint-6.pt"}]
    assert records(run_dir) == straight[2]["records"]
    assert_same_weights(weights(run), straight[2]["weights"])
    assert [p.name for p in checkpoint.checkpoints(run_dir)] == ["checkpoint-8.pt", "checkpoint-6.pt"]


# --------------------------------------------------------------------------- 3. damaged checkpoints
def damage(path: Path, kind: str) -> None:
    data = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif kind == "zero_bytes":
        path.write_bytes(b"")
    elif kind == "random_bytes":
        path.write_bytes(random.Random(0).randbytes(len(data)))
    elif kind == "broken_archive":  # the zip's central directory
        path.write_bytes(data[:-100] + b"\xa5" * 100)
    elif kind == "flipped_bytes":
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 64]) + data[middle + 64:])
    elif kind == "digest_deleted":
        checkpoint.digest_path(path).unlink()
        return
    elif kind == "foreign_file":  # a matching digest, bytes torch cannot load
        import hashlib

        garbage = b"not a checkpoint\n" * 64
        path.write_bytes(garbage)
        checkpoint.digest_path(path).write_text(f"{hashlib.sha256(garbage).hexdigest()}  {path.name}\n")
    else:
        raise ValueError(kind)
    assert path.read_bytes() != data


KINDS = ["truncated", "zero_bytes", "random_bytes", "broken_archive", "flipped_bytes", "digest_deleted",
         "foreign_file"]


@pytest.mark.parametrize("kind", KINDS)
def test_damaged_newest_checkpoint_falls_back_to_the_previous(kind, straight, interrupted3, tmp_path, capsys):
    run_dir = copy(interrupted3, tmp_path)
    newest = run_dir / "checkpoint-10.pt"
    damage(newest, kind)
    assert checkpoint.check(newest) is not None or kind == "foreign_file"
    capsys.readouterr()
    summary, run = resume(config("trainer.resume=auto", epochs=3), run_dir, (straight[3]["records"], 8))
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, warnings
    assert str(newest) in warnings[0] and "damaged" in warnings[0]
    assert warnings[0].endswith("resuming from checkpoint-8.pt")
    assert summary["status"] == "finished"
    [resumed] = summary["resumes"]
    assert (resumed["from_step"], resumed["checkpoint"]) == (8, "checkpoint-8.pt")
    [note] = resumed["damaged"]
    assert note.startswith(f"{newest} is damaged: ") and note in warnings[0]
    assert records(run_dir) == straight[3]["records"]
    assert_same_weights(weights(run), straight[3]["weights"])


def test_after_a_fallback_the_kept_checkpoints_are_intact(interrupted3, tmp_path):
    run_dir = copy(interrupted3, tmp_path)
    damage(run_dir / "checkpoint-10.pt", "truncated")
    summary, _ = resume(config("trainer.resume=auto", epochs=3), run_dir)
    assert summary["status"] == "finished"
    kept = checkpoint.checkpoints(run_dir)
    assert [checkpoint.check(path) for path in kept] == [None] * len(kept)


def test_no_intact_checkpoint_is_one_line(interrupted3, tmp_path):
    run_dir = copy(interrupted3, tmp_path)
    damage(run_dir / "checkpoint-10.pt", "truncated")
    damage(run_dir / "checkpoint-8.pt", "zero_bytes")
    with pytest.raises(UserError) as refused:
        resume(config("trainer.resume=auto", epochs=3), run_dir)
    message = one_line(refused.value)
    assert "no intact checkpoint" in message and "checkpoint-10.pt" in message and "checkpoint-8.pt" in message
    build_run(config(epochs=3), run_dir).close()  # released


# --------------------------------------------------------------------------- 4. the lock
def test_one_run_per_directory(tmp_path):
    run_dir = tmp_path / "run"
    first = build_run(config(), run_dir)
    assert (run_dir / LOCK).read_text() == f"{os.getpid()}\n"
    with pytest.raises(UserError) as refused:
        build_run(config(), run_dir)
    message = one_line(refused.value)
    assert f"process {os.getpid()}" in message and str(run_dir) in message
    first.close()
    build_run(config(), run_dir).close()


def test_leftover_temporary_files_are_removed_when_a_run_opens_the_directory(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".x.tmp").write_text("half a file")
    (run_dir / ".metrics.jsonl.abc123.tmp").write_text("{")
    (run_dir / "notes.txt").write_text("mine")
    build_run(config(), run_dir).close()
    assert not list(run_dir.glob(".*.tmp"))
    assert (run_dir / "notes.txt").read_text() == "mine"


# --------------------------------------------------------------------------- 5. sweeps
def test_sweep_survives_its_jobs_and_numbers_its_files(tmp_path, train_cli):
    """A 2x2 grid: two jobs fail to compose (trainer.lr=-1), one fails while building
    (layers.groups=1000), one finishes; exit 1. The same sweep again writes multirun-2.*, leaves
    multirun-1.* alone, and does not train the finished job again (same directory, same summary)."""
    command = ["-m", *TINY, "trainer.lr=0.05,-1", "layers.groups=0,1000", f"paths.root={tmp_path}", "study=s"]
    sweep_dir = tmp_path / "s"

    def run_sweep(k) -> dict:
        result = train_cli(*command)
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr, result.stderr
        assert f"sweep {k} in {sweep_dir}: 4 jobs: 1 finished, 3 failed" in result.stderr, result.stderr
        if k == 2:  # the relaunch: the finished job not launched, the one that failed at build rerun
            assert "(1 rerun, 1 skipped (already over))" in result.stderr, result.stderr
        report = json.loads((sweep_dir / f"multirun-{k}-summary.json").read_text())
        assert report["counts"] == {"finished": 1, "failed": 3}
        jobs = {tuple(o for o in job["overrides"] if o.split("=")[0] in ("trainer.lr", "layers.groups")): job
                for job in report["jobs"]}
        assert sorted(jobs) == sorted([("trainer.lr=0.05", "layers.groups=0"), ("trainer.lr=0.05", "layers.groups=1000"),
                                       ("trainer.lr=-1", "layers.groups=0"), ("trainer.lr=-1", "layers.groups=1000")])
        good, built = jobs["trainer.lr=0.05", "layers.groups=0"], jobs["trainer.lr=0.05", "layers.groups=1000"]
        assert good["status"] == "finished" and Path(good["run_dir"]).parent == sweep_dir
        assert json.loads((Path(good["run_dir"]) / SUMMARY).read_text())["status"] == "finished"
        assert built["status"] == "failed" and "layers.groups=1000" in built["error"] and "\n" not in built["error"]
        assert Path(built["run_dir"]).parent == sweep_dir
        recorded = json.loads((Path(built["run_dir"]) / SUMMARY).read_text())
        assert recorded == {"status": "failed", "error": built["error"]}
        for lr_bad in (("trainer.lr=-1", "layers.groups=0"), ("trainer.lr=-1", "layers.groups=1000")):
            assert jobs[lr_bad]["status"] == "failed" and jobs[lr_bad]["run_dir"] is None
            assert "trainer.lr" in jobs[lr_bad]["error"] and "\n" not in jobs[lr_bad]["error"]
        return {"good": good["run_dir"], "built": built["run_dir"]}

    dirs = run_sweep(1)
    first = {name: (sweep_dir / name).read_bytes() for name in ("multirun-1.yaml", "multirun-1-summary.json")}
    assert first["multirun-1.yaml"]  # the sweep's config, not the empty claim
    finished = (Path(dirs["good"]) / SUMMARY).read_bytes()

    assert run_sweep(2) == dirs  # a job's directory is a function of its overrides
    assert (sweep_dir / "multirun-2.yaml").read_bytes() == first["multirun-1.yaml"]
    assert {name: (sweep_dir / name).read_bytes() for name in first} == first
    assert (Path(dirs["good"]) / SUMMARY).read_bytes() == finished  # not trained again


# --------------------------------------------------------------------------- 6. any input: records or one line
@pytest.fixture(scope="module")
def image_inputs(tmp_path_factory):
    """data.path values for data=imagefolder: a good tree, and damaged or missing ones."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")

    def png(value: int) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (value, 255 - value, value // 2)).save(buffer, format="PNG")
        return buffer.getvalue()

    good = root / "good"
    for split, count in (("train", 8), ("test", 4)):
        for c, cls in enumerate(("a", "b")):
            folder = good / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                (folder / f"{i}.png").write_bytes(png(40 + 150 * c + i))
    truncated = root / "truncated"
    shutil.copytree(good, truncated)
    image = truncated / "train" / "b" / "3.png"
    image.write_bytes(image.read_bytes()[:30])
    garbage = root / "garbage.zip"
    garbage.write_bytes(random.Random(1).randbytes(2048))
    flipped = root / "flipped.zip"
    with zipfile.ZipFile(flipped, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(good.rglob("*.png")):
            zf.write(path, path.relative_to(good).as_posix())
    damage_zip_member(flipped, "test/b/0.png")
    return {"good": good, "truncated": truncated, "garbage": garbage, "flipped": flipped,
            "missing": root / "no_such_dir"}


BASE = [o for o in TINY if not o.startswith(("trainer.epochs=", "trainer.checkpoint="))]
DATA_FREE = [o for o in BASE if not o.startswith("data")]

# A valid run (trainer.lr=1e9 diverges), then up to two faults, each replacing one choice with
# bad input. ``controller`` carries its option, if any.
VALID = {
    "data": ["synthetic", "synthetic", "synthetic", "good"],
    "trainer.lr": ["0.05", "0.2", "1e9"],  # 1e9: diverges
    "trainer.epochs": ["1", "2"],
    "layers.groups": ["0", "2"],
    "controller": [("uniform", None), ("depth_linear", None), ("depth_linear", "controller.first=2.0"),
                   ("llrd", "controller.decay=0.5"), ("hypergrad", None), ("freezeout", None), ("lars", None)],
    "trainer.resume": ["false", "auto"],
    "trainer.checkpoint": ["true", "false"],
}
FAULTS = {
    "data": ["truncated", "garbage", "flipped", "missing"],  # damaged or missing data.path
    "trainer.lr": ["-1", "abc"],
    "trainer.epochs": ["0"],
    "layers.groups": ["1000"],
    "controller": [("no_such_controller", None), ("fixed_linear", None), ("depth_linear", "controller.first=abc"),
                   ("uniform", "controller.first=2.0"), ("llrd", "controller.decay=-1"),
                   ("depth_linear", "controller.no_such_option=1")],
    "trainer.resume": ["true"],  # on an empty directory
}


@st.composite
def inputs(draw):
    drawn = {key: draw(st.sampled_from(values)) for key, values in VALID.items()}
    for key in draw(st.permutations(sorted(FAULTS)))[:draw(st.integers(0, 2))]:
        drawn[key] = draw(st.sampled_from(FAULTS[key]))
    drawn["twice"] = draw(st.booleans())  # run it again in the same directory
    return drawn


def strict_json(text: str):
    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=reject)


def csv_rows(path: Path) -> list[list[str]]:
    rows = list(csv.reader(io.StringIO(path.read_text())))
    assert rows and all(len(row) == len(rows[0]) for row in rows), path
    for row in rows[1:]:
        [float(value) for value in row]  # every cell a number (nan/inf included)
    return rows


def check_complete(run_dir: Path, summary: dict, epochs: int) -> None:
    """A finished or diverged run's records: strict, parseable, and all of the same run."""
    disk = strict_json((run_dir / SUMMARY).read_text())
    assert disk["status"] in ("finished", "diverged") and disk["status"] == summary["status"]
    assert disk["steps"] == summary["steps"]
    assert (run_dir / CONFIG).is_file() and (run_dir / CONFIG).read_text().strip()
    assert not list(run_dir.glob(".*.tmp"))
    steps = disk["steps"]
    if disk["status"] == "diverged" and not (run_dir / METRICS).exists():
        metrics = []  # diverged before its first evaluation: no metrics.jsonl is written
    else:
        metrics = [strict_json(line) for line in (run_dir / METRICS).read_text().splitlines()]
    assert [row["step"] for row in metrics] == sorted({row["step"] for row in metrics})
    assert all(row["step"] <= steps for row in metrics)
    trace = csv_rows(run_dir / TRACE)
    assert trace[0][3:] == disk["layers"]
    assert [int(row[0]) for row in trace[1:]] == list(range(steps))  # trace_every is 1 in runs this short
    losses = csv_rows(run_dir / TRAIN_LOSS)
    assert losses[0] == ["step", "epoch", "train_loss", "lr"] and int(losses[-1][0]) == steps
    if disk["status"] == "finished":
        assert disk["epochs_done"] == epochs and [row["epoch"] for row in metrics] == list(range(1, epochs + 1))
        assert metrics[-1]["step"] == steps
    else:
        assert disk["reason"] in ("non_finite", "loss_explosion") and disk["diverged_at_step"] == steps


@settings(PROFILE)
@given(drawn=inputs())
def test_any_input_ends_in_complete_records_or_one_line(drawn, image_inputs):
    data = drawn["data"]
    if data == "synthetic":
        overrides = list(BASE)
    else:
        overrides = [*DATA_FREE, "data=imagefolder", f"data.path={image_inputs[data]}", "data.cache=false",
                     "data.workers=0"]
    controller, option = drawn["controller"]
    overrides += [f"{key}={drawn[key]}" for key in ("trainer.lr", "trainer.epochs", "layers.groups",
                                                    "trainer.resume", "trainer.checkpoint")]
    overrides += [f"controller={controller}", *([option] if option else [])]
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        outcomes = []
        for _ in range(2 if drawn["twice"] else 1):
            try:
                summary = train(compose(overrides), run_dir)
            except UserError as error:
                one_line(error)
                event(f"data={data}: UserError")
                outcomes.append(None)
                continue
            event(f"data={data}: {summary['status']}")
            check_complete(run_dir, summary, int(drawn["trainer.epochs"]))
            outcomes.append((run_dir / SUMMARY).read_bytes())
        if len(outcomes) == 2 and outcomes[0] is not None:
            if drawn["trainer.resume"] == "false":
                assert outcomes[1] is None  # refused: the directory holds a run
            else:
                assert outcomes[1] == outcomes[0]  # over: its summary, untouched
