"""The command line as a user meets it: one clear line for bad input, full records for good input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from meta_llr.faults import damage_zip_member

ROOT = Path(__file__).resolve().parent.parent


def cli(*args, cwd=None, timeout=300):
    env = dict(os.environ, WANDB_MODE="disabled", HYDRA_FULL_ERROR="0")
    return subprocess.run([sys.executable, "-m", "meta_llr.train", *args], cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)


def one_line_error(result, *fragments):
    assert result.returncode != 0, result.stdout
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("args,fragments", [
    (["controller=nope"], ["unknown controller 'nope'; valid:", "uniform"]),
    (["model=nope"], ["unknown model 'nope'; valid:", "resnet", "shallow"]),
    (["data=nope"], ["unknown data 'nope'; valid:", "digits", "imagefolder"]),
    (["schedule=nope"], ["unknown schedule 'nope'; valid:", "onecycle", "step"]),
    (["data=imagefolder", "data.path=/no/such/dir"], ["/no/such/dir", "data.path"]),
    (["trainer.epochs=0"], ["trainer.epochs", ">= 1"]),
    (["trainer.lr=-0.1"], ["trainer.lr", "> 0"]),
    (["layers.groups=99"], ["layers.groups=99", "layers"]),
    (["~trainer.lr"], ["~trainer.lr deletes an option", "trainer.lr=VALUE"]),
    (["seed=99999999999999999999"], ["seed=99999999999999999999 is out of range", "<= 2147482648"]),
])
def test_bad_input_gives_one_line(args, fragments, tmp_path, train_cli):
    one_line_error(train_cli(*args, f"hydra.run.dir={tmp_path}/run", "quiet=true"), "error:", *fragments)


def test_bad_files_give_one_line(tmp_path, train_cli):
    """Faults found while loading (a damaged zip member, garbage rnn_meta weights) end in one line too."""
    import io
    import zipfile

    from PIL import Image

    def png(value):
        buf = io.BytesIO()
        Image.new("RGB", (4, 4), (value, value, value)).save(buf, format="PNG")
        return buf.getvalue()

    zpath = tmp_path / "tree.zip"
    with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for split in ("train", "test"):
            for cls in ("a", "b"):
                zf.writestr(f"{split}/{cls}/0.png", png(40 if cls == "a" else 200))
    damage_zip_member(zpath, "test/b/0.png")
    one_line_error(train_cli("data=imagefolder", f"data.path={zpath}", "data.cache=false", "device=cpu", "trainer.epochs=1",
                       f"hydra.run.dir={tmp_path}/zip", "quiet=true"), "error:", str(zpath), "test/b/0.png")
    weights = tmp_path / "weights.pt"
    weights.write_text("not weights")
    one_line_error(train_cli("controller=rnn_meta", "controller.learn=off", f"controller.weights={weights}",
                       f"hydra.run.dir={tmp_path}/rnn", "quiet=true"), "error:", str(weights))


def test_digits_run_from_the_cli_writes_every_record(tmp_path):
    run_dir = tmp_path / "run"
    result = cli("controller=uniform", f"hydra.run.dir={run_dir}", "quiet=true")
    assert result.returncode == 0, result.stderr
    for name in ["config.yaml", "env.json", "layers.csv", "metrics.jsonl", "llr.csv", "summary.json"]:
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["data"] == "digits"
    assert summary["final_test_acc"] >= 0.90, summary
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 10
    for key in ["epoch", "step", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "wall_s"]:
        assert key in metrics[-1]
    trace = (run_dir / "llr.csv").read_text().splitlines()
    assert trace[0].startswith("step,progress,global_lr,") and len(trace) - 1 >= 100


def test_multirun_writes_one_dir_per_job(tmp_path, train_cli):
    result = train_cli("-m", "seed=0,1", "study=sweep", f"paths.root={tmp_path}", "trainer.epochs=1", "quiet=true")
    assert result.returncode == 0, result.stderr
    summaries = sorted((tmp_path / "sweep").glob("*/summary.json"))
    assert len(summaries) == 2
    assert {json.loads(p.read_text())["seed"] for p in summaries} == {0, 1}


def test_divergence_ends_cleanly_with_records(tmp_path, train_cli):
    run_dir = tmp_path / "run"
    result = train_cli("model=mlp", "trainer.lr=1e6", "trainer.weight_decay=0", "schedule=constant",
                       f"hydra.run.dir={run_dir}", "quiet=true")
    assert result.returncode == 0, result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["diverged_at_step"] > 0
    for name in ["config.yaml", "env.json", "layers.csv", "llr.csv", "summary.json"]:
        assert (run_dir / name).is_file(), name
