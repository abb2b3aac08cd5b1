#!/usr/bin/env bash
# The CIFAR-10 runs behind docs/results.md, on one CUDA GPU (about 3 minutes on an H200):
#   - the discussion's first study (shallow, step schedule; uniform, depth_linear 1.5->0.5, the
#     reversed 0.5->1.5, fixed_linear), 10 epochs x 3 seeds, and freezeout (issues 3, 6);
#   - 5-epoch shallow runs of every adaptive controller next to uniform (issue 4), and the
#     curvature probe on resnet-20;
#   - rnn_meta frozen with meta-trained weights and online (issue 5).
# Independent streams run in parallel: each run is far too small to fill the GPU.
#
# Usage: scripts/gpu_figures.sh CIFAR_DIR [RNN_WEIGHTS]
#   CIFAR_DIR holds the CIFAR-10 JPEG copy (train/ and test/ folders or the two zips).
#   Runs go to $ROOT (default runs/gpu); a tarball of their records (no checkpoints) to $OUT.
# The CIFAR-10 copy is JPEG q75: accuracies run slightly below published CIFAR-10 numbers.
set -uo pipefail
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
cd "$(dirname "$0")/.."
DATA=$(cd "${1:?usage: scripts/gpu_figures.sh CIFAR_DIR [RNN_WEIGHTS]}" && pwd)
WEIGHTS=${2:-runs/meta/rnn_digits/weights.pt}
ROOT=${ROOT:-runs/gpu}
OUT=${OUT:-./gpu_figures_out}
PYTHON=${PYTHON:-python}
mkdir -p "$ROOT" "$OUT"
DEVICE=${DEVICE:-cuda}
C="data=imagefolder data.path=$DATA data.augment.flip=true data.workers=1 device=$DEVICE quiet=true trainer.checkpoint=false"
train() { "$PYTHON" -m meta_llr.train $C "$@" || echo "!! failed: $*"; }

echo "== decode and cache the data once"
train controller=uniform model=shallow trainer.epochs=1 data.val_size=0 hydra.run.dir="$ROOT/warmup"

study_file="$ROOT/discussion_first_gpu.yaml"
"$PYTHON" - "$DATA" "$study_file" <<'EOF'
import sys, yaml
from importlib.resources import files
study = yaml.safe_load(files("meta_llr.studies").joinpath("discussion_first.yaml").read_text())
study["grid"].update(epochs=10, seeds=[0, 1, 2], overrides=[f"data.path={sys.argv[1]}", "data.augment.flip=true"])
study["description"] += " GPU run: 10 epochs, 3 seeds."
open(sys.argv[2], "w").write(yaml.safe_dump(study, sort_keys=False))
EOF

stream_study() {
    "$PYTHON" -m meta_llr.study run "$study_file" --root "$ROOT" device=$DEVICE trainer.checkpoint=false data.workers=1
    train controller=freezeout model=shallow trainer.epochs=10 study=discussion_first_gpu hydra.run.dir="$ROOT/issue3/freezeout"
    train controller=uniform model=shallow trainer.epochs=10 study=discussion_first_gpu hydra.run.dir="$ROOT/issue3/uniform"
}
stream_adaptive() {
    B="model=shallow trainer.epochs=5 study=issue4"
    for args in "controller=uniform" "controller=hessian_secant" "controller=hessian_secant controller.gain=0.1" \
                "controller=adam_probe" "controller=adam_probe controller.apply=false" "controller=layca" \
                "controller=lars trainer.lr=5" "controller=hypergrad"; do
        name=$(echo "$args" | sed "s/controller=//; s/controller\.//g; s/[ =]/_/g")
        train $B $args hydra.run.dir="$ROOT/issue4/$name"
    done
}
stream_learned() {
    B="model=shallow trainer.epochs=5 study=issue5"
    train $B controller=rnn_meta controller.learn=off "controller.weights=$(cd "$(dirname "$WEIGHTS")" && pwd)/$(basename "$WEIGHTS")" \
        hydra.run.dir="$ROOT/issue5/rnn_meta_off"
    train $B controller=rnn_meta hydra.run.dir="$ROOT/issue5/rnn_meta_online"
    train $B controller=uniform hydra.run.dir="$ROOT/issue5/uniform"
    train model=resnet trainer.epochs=5 diagnostics.curvature_every=1 controller=uniform study=issue4 \
        hydra.run.dir="$ROOT/issue4/curvature_resnet20"
}

SECONDS=0
stream_study > "$OUT/study.log" 2>&1 &
stream_adaptive > "$OUT/adaptive.log" 2>&1 &
stream_learned > "$OUT/learned.log" 2>&1 &
wait
echo "== runs done in ${SECONDS}s"
grep -h "!! failed" "$OUT"/*.log || true

"$PYTHON" - "$ROOT" <<'EOF'
import json, sys
from pathlib import Path
for summary in sorted(Path(sys.argv[1]).rglob("summary.json")):
    s = json.loads(summary.read_text())
    print(f"{str(summary.parent.relative_to(sys.argv[1])):<58} {s['status']:<9} test {s['final_test_acc']} "
          f"best {s['best_test_acc']} wall {s['wall_s']:.1f}s")
EOF
tar czf "$OUT/gpu_runs.tgz" --exclude=checkpoint.pt --exclude='*.log' "$ROOT"
ls -la "$OUT"
