"""``python -m meta_llr.train controller=NAME model=NAME data=NAME schedule=NAME key=value ...``

The command: Hydra composes the typed config (:mod:`meta_llr.config`), :func:`meta_llr.run.train`
trains. Every override is checked before Hydra starts (types, ranges, names, the controller's
own options), so bad input is one line on stderr and exit status 2, never a traceback; in a
multirun (``-m``) every job's overrides are checked before the first job runs.
"""
from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig

from meta_llr.errors import UserError
from meta_llr.run import train


def _hydra_main(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        summary = train(cfg, out_dir)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    return summary.get("final_test_acc")


def job_overrides(argv: list[str]) -> list[list[str]]:
    """The overrides of every job that ``argv`` launches (one list without ``-m``), from
    Hydra's own override grammar and sweep expansion; Hydra's flags and ``hydra.*`` keys dropped."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    multirun = any(a in ("-m", "--multirun") for a in argv)
    overrides = [a for a in argv if not a.startswith("-") and "=" in a and not a.lstrip("+~").startswith("hydra")]
    if not multirun:
        return [overrides]
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [list(job) for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def check_argv(argv: list[str]) -> None:
    """Compose and check the config of every job ``argv`` would run; one UserError line."""
    from meta_llr.config import compose

    if any(a in ("--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--shell-completion", "-sc")
           or a.startswith(("--cfg=", "--info=")) for a in argv):
        return
    try:
        jobs = job_overrides(argv)
    except Exception as error:  # a malformed override: Hydra's parser says what is wrong
        raise UserError(f"bad override: {str(error).splitlines()[0]}") from None
    for job in jobs:
        compose(job)


def main() -> None:
    import hydra

    from meta_llr.config import register_configs

    try:
        register_configs()
        check_argv(sys.argv[1:])
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    hydra.main(version_base="1.3", config_path="pkg://meta_llr.conf", config_name="config")(_hydra_main)()


if __name__ == "__main__":
    main()
