#!/usr/bin/env bash
# The first powered study (issue 17), meta_llr/studies/first_look.yaml, end to end on this
# machine's CPU; every step is a shipped command and a rerun skips what is done.
#   scripts/first_look.sh [STEP ...]     steps: lr meta pilot plan export grid report (default: all)
# Steps 1-4 fixed the study file's trainer.lr, rnn_meta weights, seeds and replay curve; a
# rerun of them reproduces those choices (the file is not rewritten: compare and edit by hand).
# The data: the CIFAR-10 JPEG q75 copy at ../shared/data/cifar10-jpeg (lossy).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DATA="data=imagefolder data.path=../shared/data/cifar10-jpeg data.augment.flip=true"
SETTING="model=shallow model.width=16 $DATA data.train_subset=5000 trainer.epochs=3 trainer.eval_every=3 trainer.log_every=10 schedule=step"
steps=${*:-lr meta pilot plan export grid report}

for step in $steps; do
  echo "== $step ($(date -u +%H:%M:%S))"
  case $step in
  lr)  # 1. the global LR, tuned once for uniform: 5,000 train images held out as validation
    $PYTHON -m meta_llr.train -m controller=uniform $SETTING data.val_size=5000 seed=0 \
      trainer.lr=0.025,0.05,0.1,0.2,0.4 study=first_look_lr quiet=true \
      hydra.sweep.dir=runs/first_look_lr 'hydra.sweep.subdir=lr${trainer.lr}'
    $PYTHON -m meta_llr.compare runs/first_look_lr --by trainer.lr --metric final_val_acc ;;
  meta)  # 2. rnn_meta's weights by evolution strategies on short runs of the same data
    $PYTHON -m meta_llr.metatrain --out runs/first_look_meta --iterations 4 --pairs 2 --workers 2 --threads 1 \
      --task "model=shallow model.width=16 $DATA data.train_subset=2000 trainer.log_every=10" \
      --seeds 0,1 --epochs 1 --val-size 1000 --eval-every 2 --set trainer.lr=0.2 $( [ -f runs/first_look_meta/metatrain_state.pt ] && echo --resume )
    echo "study weights: meta_llr/studies/first_look_rnn_meta.pt (cp runs/first_look_meta/weights.pt there)" ;;
  pilot)  # 3. a pilot with other seeds: the hypotheses' arms x 3, one seed of the adaptive arms
    $PYTHON -m meta_llr.study run first_look --root runs/pilot --seeds 100,101,102 --arms uniform,depth_linear,reversed,fixed_linear
    $PYTHON -m meta_llr.study run first_look --root runs/pilot --seeds 100 --arms freezeout,hessian_secant,adam_probe,prodigy_layer,rnn_meta ;;
  plan)
    $PYTHON -m meta_llr.study plan first_look --pilot runs/pilot/first_look ;;
  export)  # 4. the replay arm's curve: the adaptive arm with the best pilot accuracy (see the report)
    $PYTHON -m meta_llr.compare runs/pilot/first_look --by arm
    $PYTHON -m meta_llr.export runs/pilot/first_look/${SOURCE:-hessian_secant}-s100 --out runs/first_look_replay/curve.json
    echo "study curve: meta_llr/studies/first_look_replay.json (cp runs/first_look_replay/curve.json there)" ;;
  grid)
    $PYTHON -m meta_llr.study run first_look ;;
  report)
    $PYTHON -m meta_llr.study report first_look --out docs/studies/first-look.md ;;
  *) echo "unknown step $step (lr meta pilot plan export grid report)" >&2; exit 2 ;;
  esac
done
