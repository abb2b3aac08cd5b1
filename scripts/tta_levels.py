"""A run's test accuracy and loss under each test-time augmentation level, from its newest checkpoint.

    python scripts/tta_levels.py RUN_DIR [OVERRIDE ...]      e.g. data.path=../shared/data/cifar10-jpeg

The run is rebuilt from ``RUN_DIR/config.yaml`` (plus the overrides, for a dataset that moved) in a
scratch directory, loaded from its newest intact checkpoint and evaluated on the test split with
``trainer.tta`` = 0 (the image), 1 (and its mirror) and 2 (and the 1-pixel translations), as
:meth:`meta_llr.run.Run.tta_logits` defines them. ``RUN_DIR`` is only read.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print(f"usage: {__doc__.strip().splitlines()[2].strip()}", file=sys.stderr)
        return 2
    from meta_llr import checkpoint
    from meta_llr.errors import UserError
    from meta_llr.run import build_run

    run_dir = Path(argv[0])
    try:
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"{run_dir} holds no config.yaml; give the directory of a run")
        cfg = OmegaConf.merge(OmegaConf.load(run_dir / "config.yaml"), OmegaConf.from_dotlist(argv[1:]))
        with tempfile.TemporaryDirectory() as scratch:
            run = build_run(cfg, scratch)
            try:
                loaded = checkpoint.load_latest(run_dir, run.device)
                if loaded is None:
                    raise UserError(f"{run_dir} holds no intact checkpoint; train with trainer.checkpoint=true")
                state, path, _ = loaded
                run.load_state_dict(state)
                print(f"{run_dir}: {path.name}, step {run.step}")
                for level in (0, 1, 2):
                    run.tta, start = level, time.perf_counter()
                    loss, acc = run.evaluate("test")
                    print(f"  trainer.tta={level}: test acc {acc:.4f}, test loss {loss:.4f} "
                          f"({time.perf_counter() - start:.0f} s)")
            finally:
                run.records.close()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
