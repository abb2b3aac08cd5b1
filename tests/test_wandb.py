"""W&B logger: an offline run's transaction log holds the config, history and summary keys."""
import csv
import hashlib
import json
import struct
import time
from pathlib import Path

import pytest

from meta_llr.errors import UserError
from meta_llr.loggers import make_logger


def read_wandb_records(path: Path):
    """Records of an offline ``run-*.wandb`` file (LevelDB-log framing of protobuf Records:
    a 7-byte file header, 32 KiB blocks, each chunk ``crc:u32 length:u16 type:u8`` + data)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunks = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too small for a chunk header: padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def finished_records(tmp_path, timeout: float = 60.0) -> list:
    """The records of the one offline run file, once W&B's service has written all of it:
    ``run.finish()`` can return before the service flushes the file, so wait for the exit
    record and a stable size."""
    deadline, last_size = time.monotonic() + timeout, -1
    while True:
        files = list(Path(tmp_path).glob("wandb/offline-run-*/run-*.wandb"))
        assert len(files) <= 1, files
        if files:
            size = files[0].stat().st_size
            try:
                records = list(read_wandb_records(files[0]))
            except Exception:  # noqa: BLE001 - a chunk still being written
                records = []
            if size == last_size and any(r.WhichOneof("record_type") == "exit" for r in records):
                return records
            last_size = size
        assert time.monotonic() < deadline, "the offline W&B run file was not completed"
        time.sleep(0.2)


def offline_run(tmp_path):
    history, summary, run = [], {}, None
    for record in finished_records(tmp_path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            summary.update({i.key or "/".join(i.nested_key): i.value_json for i in record.summary.update})
        elif kind == "run":
            run = record.run
    return history, summary, run


def test_offline_run_records_metrics_trace_and_summary(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    summary, out = tiny_run("logger=[csv,wandb]", "study=wbtest", name="wb-run")
    assert summary["status"] == "finished"
    history, wb_summary, run = offline_run(tmp_path)

    assert run.display_name == "wb-run" and run.run_group == "wbtest" and run.job_type == "uniform"
    # One W&B run per run directory: the id is the directory's, so a resume continues it.
    assert run.run_id == hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:16]
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["trainer"]["epochs"] == 2 and config["controller"] == {"name": "uniform"}

    layers = summary["layers"]
    trace_rows = [h for h in history if f"llr/{layers[0]}" in h]
    assert len(trace_rows) == summary["steps"]  # trace_every = 1 on an 8-step run
    assert [h["step"] for h in trace_rows] == list(range(summary["steps"]))
    assert all(h[f"llr/{name}"] == 1.0 for h in trace_rows for name in layers)
    evals = [h for h in history if "test_acc" in h]
    assert [h["epoch"] for h in evals] == [1, 2]
    assert evals[-1]["test_acc"] == pytest.approx(summary["final_test_acc"])
    assert f"rotation/{layers[0]}" in evals[-1] and f"grad_norm/{layers[-1]}" in evals[-1]
    assert any(k.startswith("llr_trace") for h in history for k in h)  # the line-series chart

    assert json.loads(wb_summary["status"]) == "finished"
    assert json.loads(wb_summary["final_test_acc"]) == pytest.approx(summary["final_test_acc"])
    assert f"final_rotation/{layers[0]}" in wb_summary
    assert (out / "summary.json").exists()  # csv records always written


def test_disabled_and_unknown_logger(tiny_run, tmp_path, monkeypatch, make_config):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    summary, _ = tiny_run("logger=[csv,wandb]")
    assert summary["status"] == "finished"
    assert not list(tmp_path.glob("wandb/*run-*"))
    with pytest.raises(UserError, match=r"logger=\[csv,tensorboard\] is out of range; allowed: .*one of csv, wandb"):
        make_config("logger=[csv,tensorboard]")


def test_wandb_failure_never_fails_training(tiny_run, tmp_path, monkeypatch):
    import wandb

    def broken(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(wandb, "init", broken)
    with pytest.warns(UserWarning, match="csv records only"):
        summary, out = tiny_run("logger=[csv,wandb]")
    assert summary["status"] == "finished" and (out / "llr.csv").exists()


def test_offline_run_logs_layer_lrs_per_step_interval_loss_and_tables(tiny_run, tmp_path, monkeypatch):
    """Absolute per-layer LRs (global_lr x scale) at every trace row against step, the
    train_loss.csv rows, and each controller table (freezing.csv) as a wandb.Table per evaluation."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    summary, out = tiny_run("logger=[csv,wandb]", "controller=freezeout", "trainer.log_every=2",
                            "trainer.eval_every_steps=3", name="wb-tables")
    assert summary["status"] == "finished"
    history, _, _ = offline_run(tmp_path)
    layers = summary["layers"]
    trace = [h for h in history if f"lr/{layers[0]}" in h]
    assert [h["step"] for h in trace] == list(range(summary["steps"]))
    for h in trace:
        for name in layers:
            assert h[f"lr/{name}"] == pytest.approx(h["global_lr"] * h[f"llr/{name}"])
    assert any(h[f"lr/{layers[0]}"] != h[f"lr/{layers[-1]}"] for h in trace)  # freezeout: per layer
    with open(out / "train_loss.csv") as handle:
        rows = list(csv.DictReader(handle))
    logged = [(h["step"], h["train_loss_interval"]) for h in history if "train_loss_interval" in h]
    assert logged == [(int(r["step"]), pytest.approx(float(r["train_loss"]))) for r in rows]
    assert [s for s, _ in logged] == [2, 4, 6, 8]
    evals = [h for h in history if "test_acc" in h]
    assert [h["step"] for h in evals] == [3, 4, 6, 8]  # every 3rd step and each epoch's end
    assert all(h["tables/freezing/_type"] == "table-file" and h["tables/freezing/nrows"] == len(layers)
               for h in evals)  # a table is a file beside the run, its history entry points to it
    media = Path(evals[-1]["tables/freezing/path"]).name
    assert list(tmp_path.glob(f"wandb/offline-run-*/files/**/{media}"))
