#!/usr/bin/env bash
# One-command GPU check (issue 7), about 5 minutes on one H200:
#   1. python -m meta_llr.bench on CUDA: bare loop vs every registered controller,
#      fastnet, resnet (20) and resnet56, batch 512 -> bench.json, images/s and ratios;
#   2. the sync check: 50 steps of Run.train_step per controller (fastnet and resnet)
#      under torch.cuda.set_sync_debug_mode("error");
#   3. a 10-epoch fastnet run on the CIFAR-10 JPEG copy with trainer.compile=true
#      -> images/s and test accuracy;
#   4. several runs per GPU: 4 short shallow runs one at a time, then 4 at once (joblib);
#   5. replicas (issue 16): 16 replicas of shallow and of ResNet-20 in one process against 16
#      sequential runs -> bench_replicas.json (target: >= 4x the images/s);
#   6. the airbench recipe: +recipe=airbench, 10 epochs, compiled -> test accuracy (target 0.93) and
#      time per run; then seeds 1..RECIPE_REPLICAS (default 4) as replicas in one process -> mean, sd;
#   and writes gpu_check.json and gpu_check.md (the tables of parts 1, 3, 5 and 6).
#
# Usage:  scripts/gpu_check.sh [CIFAR_DIR]
#   CIFAR_DIR (or $CIFAR_DIR): folder with cifar10-train.zip and cifar10-test.zip, or train/ and test/
#   (default .data/cifar10-jpeg, a git-ignored folder in the repo).
#   Outputs (bench.json, logs, the run's records) go to $OUT if set, else ./gpu_check_out.
# Each part's failure is reported and the other parts still run; the exit status is the
# number of failed parts.
set -euo pipefail
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
CIFAR_DIR=${1:-${CIFAR_DIR:-.data/cifar10-jpeg}}
OUT=${OUT:-./gpu_check_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SECONDS=0
failed=()

echo "== environment"
if ! "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda available:', torch.cuda.is_available())"; then
    echo "FATAL: torch is not importable with $PYTHON; install the dependencies first" >&2
    exit 10
fi
if ! "$PYTHON" -c "import meta_llr" 2>/dev/null; then
    echo "installing the project (pip install -e . --no-deps)"
    "$PYTHON" -m pip install -q -e . --no-deps
fi
"$PYTHON" -c "import hydra, omegaconf, meta_llr.train" || { echo "FATAL: missing packages (hydra-core, omegaconf, ...)" >&2; exit 11; }
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "FATAL: no CUDA GPU visible" >&2
    exit 12
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c "import torch; print(torch.cuda.get_device_name(), 'capability', torch.cuda.get_device_capability())"

part() {  # part NAME COMMAND...: run, log to $OUT/NAME.log, record a failure without stopping
    local name=$1; shift
    echo; echo "== $name ($(date -u +%H:%M:%S), ${SECONDS}s so far)"
    local rc=0
    "$@" 2>&1 | tee "$OUT/$name.log" || rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "!! $name FAILED (exit $rc), see $OUT/$name.log"
        failed+=("$name")
    fi
}

part sync_check "$PYTHON" -m meta_llr.bench --device cuda --models fastnet,resnet --batch 512 --sync-check
part bench "$PYTHON" -m meta_llr.bench --device cuda --models fastnet,resnet,resnet56 --batch 512 --steps ${BENCH_STEPS:-60} --out "$OUT"

if { [ -f "$CIFAR_DIR/cifar10-train.zip" ] && [ -f "$CIFAR_DIR/cifar10-test.zip" ]; } || { [ -d "$CIFAR_DIR/train" ] && [ -d "$CIFAR_DIR/test" ]; }; then
    part fastnet_cifar10 "$PYTHON" -m meta_llr.train controller=uniform model=fastnet data=imagefolder \
        "data.path=$(cd "$CIFAR_DIR" && pwd)" data.augment.flip=true data.workers=1 "data.root=${CACHE_DIR:-/tmp/meta_llr_cache}" device=cuda \
        trainer.epochs=${COMPILE_EPOCHS:-1} trainer.batch_size=512 trainer.lr=0.1 schedule=onecycle trainer.label_smoothing=0.2 \
        trainer.compile=true trainer.checkpoint=false quiet=true "hydra.run.dir=$OUT/fastnet_cifar10"
    if [ -f "$OUT/fastnet_cifar10/summary.json" ]; then
        "$PYTHON" - "$OUT/fastnet_cifar10" 50000 <<'EOF' || true
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
s = json.loads((run / "summary.json").read_text())
rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
n_train = int(sys.argv[2])
images = n_train * s["epochs_done"]
print(f"fastnet CIFAR-10 (JPEG copy), {s['epochs_done']} epochs, compile: status {s['status']}, final test acc {s['final_test_acc']}, "
      f"best {s['best_test_acc']}, {s['wall_s']:.1f} s wall (compile and evaluation included), "
      f"{images / s['wall_s']:,.0f} images/s overall")
if len(rows) >= 2:  # epochs after the first: compilation done
    dt = rows[-1]["wall_s"] - rows[0]["wall_s"]
    print(f"  epochs 2-{len(rows)}: {n_train * (len(rows) - 1) / dt:,.0f} images/s (training + per-epoch evaluation)")
EOF
    fi
else
    echo; echo "!! fastnet_cifar10 SKIPPED: no cifar10-train.zip / cifar10-test.zip in $CIFAR_DIR"
    failed+=("fastnet_cifar10")
fi

# 4. Several runs per GPU (docs/cluster.md): the same 4 short shallow runs on the CIFAR copy,
#    one at a time and 4 at once through the joblib launcher; the images/s of each way.
packed() {
    local n=$1 start=$SECONDS
    "$PYTHON" -m meta_llr.train -m hydra/launcher=joblib hydra.launcher.n_jobs=$n seed=0,1,2,3 model=shallow \
        data=imagefolder "data.path=$(cd "$CIFAR_DIR" && pwd)" data.augment.flip=true data.train_subset=10000 \
        "data.root=${CACHE_DIR:-/tmp/meta_llr_cache}" device=cuda trainer.epochs=2 trainer.checkpoint=false \
        quiet=true "paths.root=$OUT/packed$n" study=p hydra/job_logging=disabled
    local took=$((SECONDS - start))
    echo "packed runs: $n at once: 4 runs x 2 epochs x 10,000 images in ${took}s -> $((80000 / (took > 0 ? took : 1))) images/s"
}
if [ -d "$CIFAR_DIR" ]; then
    part packed_runs bash -c "$(declare -f packed); PYTHON=$PYTHON CIFAR_DIR=$CIFAR_DIR CACHE_DIR=${CACHE_DIR:-} OUT=$OUT; packed 1 && packed 4"
fi

part replicas "$PYTHON" -m meta_llr.bench --device cuda --models shallow,resnet --controllers uniform,depth_linear \
    --replicas 16 --batch 512 --steps ${REPLICA_STEPS:-10} --warmup 3 --out "$OUT"

# 6. The airbench recipe (issue 16, part 3): fastnet, +recipe=airbench, 10 epochs on the JPEG copy,
#    compiled; target >= 93 % test accuracy (airbench94: 94.0 % on official CIFAR-10).
if [ -d "$CIFAR_DIR" ]; then
    part recipe "$PYTHON" -m meta_llr.train +recipe=airbench data=imagefolder "data.path=$(cd "$CIFAR_DIR" && pwd)" \
        data.workers=1 "data.root=${CACHE_DIR:-/tmp/meta_llr_cache}" device=cuda trainer.compile=true \
        trainer.checkpoint=false quiet=true seed=${RECIPE_SEED:-0} "hydra.run.dir=$OUT/recipe"
    # 6b. Its accuracy over more seeds at about the price of one: replicas (not compiled), seeds 1..S.
    part recipe_seeds "$PYTHON" -m meta_llr.train +recipe=airbench data=imagefolder "data.path=$(cd "$CIFAR_DIR" && pwd)" \
        data.workers=1 "data.root=${CACHE_DIR:-/tmp/meta_llr_cache}" device=cuda trainer.checkpoint=false quiet=true \
        seed=1 replicas=${RECIPE_REPLICAS:-4} "hydra.run.dir=$OUT/recipe_seeds"
fi

echo; echo "== summary (${SECONDS}s)"
"$PYTHON" - "$OUT" <<'EOF' || true
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None
bench, replicas, fastnet = load("bench.json"), load("bench_replicas.json"), load("fastnet_cifar10/summary.json")
recipe = load("recipe/summary.json")
seeds = [s for s in (load(f"recipe_seeds/{d.name}/summary.json") for d in sorted((out / "recipe_seeds").glob("s*"))) if s]
md = ["# GPU check", "", "| model | controller | ms/step | images/s | ratio | target | +ops | +ops, mean of 20 | ok |",
      "|---|---|---|---|---|---|---|---|---|"]
for r in bench or []:
    ok = "" if r["meets_target"] is None else ("yes" if r["meets_target"] and r["meets_memory"] else "NO")
    md.append(f"| {r['model']} | {r['controller']} | {r['step_ms_median']:.2f} | {r['images_per_s']:,.0f} | "
              f"{r['ratio_to_bare']:.3f} | {r['target'] or '-'} | {r['extra_kernel_ops']} | "
              f"{r.get('extra_kernel_ops_mean', '-')} | {ok} |")
if replicas:
    md += ["", "| model | controller | S | images/s together | images/s sequential | speedup |", "|---|---|---|---|---|---|"]
    md += [f"| {r['model']} | {r['controller']} | {r['replicas']} | {r['images_per_s_replicas']:,.0f} | "
           f"{r['images_per_s_sequential']:,.0f} | {r['speedup']:.2f} |" for r in replicas]
if fastnet:
    md += ["", f"fastnet, trainer.compile=true, CIFAR-10 JPEG copy: {fastnet['status']}, test acc "
           f"{fastnet['final_test_acc']}, {fastnet['wall_s']:.1f} s for {fastnet['epochs_done']} epoch(s)"]
if recipe:
    md += ["", f"+recipe=airbench (fastnet, 10 epochs, compiled), CIFAR-10 JPEG copy (lossy): {recipe['status']}, "
           f"test acc {recipe['final_test_acc']} (target 0.93), {recipe['wall_s']:.1f} s wall (compile included)"]
if seeds:
    import statistics
    accs = [s["final_test_acc"] for s in seeds]
    spread = f", sd {statistics.stdev(accs):.4f}" if len(accs) > 1 else ""
    md += ["", f"+recipe=airbench as {len(accs)} replicas (seeds {', '.join(str(s['seed']) for s in seeds)}), CIFAR-10 JPEG "
           f"copy (lossy): test acc mean {statistics.mean(accs):.4f}{spread} (each: {', '.join(f'{a:.4f}' for a in accs)}; "
           f"status {', '.join(s['status'] for s in seeds)}), {seeds[0]['wall_s']:.1f} s wall for all of them together"]
(out / "gpu_check.md").write_text("\n".join(md) + "\n")
(out / "gpu_check.json").write_text(json.dumps({"bench": bench, "replicas": replicas, "compile_run": fastnet,
                                                "recipe": recipe, "recipe_seeds": seeds}, indent=1))
print("\n".join(md))
EOF
if [ -f "$OUT/bench.json" ]; then
    "$PYTHON" - "$OUT/bench.json" <<'EOF' || true
import json, sys
rows = json.load(open(sys.argv[1]))
for r in rows:
    mark = "" if r["meets_target"] is None else ("ok" if r["meets_target"] and r["meets_memory"] else "MISSED")
    print(f"{r['model']:<9} {r['controller']:<17} {r['step_ms_median']:8.2f} ms  {r['images_per_s']:>9,.0f} img/s  "
          f"ratio {r['ratio_to_bare']:.3f} (target {r['target'] or '-'})  extra {r['extra_state_ratio']:.3f}x  {mark}")
EOF
fi
grep -h "sync-check:" -A30 "$OUT/sync_check.log" 2>/dev/null || true
if [ ${#failed[@]} -eq 0 ]; then
    echo "all parts ran; outputs in $OUT"
else
    echo "FAILED parts: ${failed[*]}; outputs in $OUT"
fi
exit ${#failed[@]}
