"""``python -m meta_llr.train controller=NAME model=NAME data=NAME schedule=NAME key=value ...``

The command: Hydra composes the typed config (:mod:`meta_llr.config`), :func:`meta_llr.run.train`
trains. Every override is checked before Hydra starts (types, ranges, names, the controller's
own options, a writable run directory), so bad input is one line on stderr and exit status
2, never a traceback. In a multirun (``-m``) only the override grammar is checked first; each
job is checked by meta_llr's sweeper (:mod:`meta_llr.sweep`), and a job that fails is recorded
and the sweep goes on (exit status 1 if any failed). A run stopped by SIGTERM, SIGINT or
SIGUSR1 checkpoints, records ``interrupted`` and exits with 128 + the signal's number.
"""
from __future__ import annotations

import sys
import traceback
from pathlib import Path

from omegaconf import DictConfig

from meta_llr.errors import Interrupted, UserError
from meta_llr.run import train


def _hydra_main(cfg: DictConfig) -> dict:
    """One job: its summary and ``run_dir``. In a sweep a failure is recorded and returned."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from meta_llr import sweep

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        summary = train(cfg, out_dir)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        if not multirun:
            sys.exit(2)
        summary = {"status": "failed", "error": str(error)}
        sweep.record_failure(out_dir, str(error))
    except Exception as error:  # a crash is a bug: show it, record it, let the sweep go on
        if not multirun:
            raise
        traceback.print_exc()
        summary = {"status": "failed", "error": f"{type(error).__name__}: {error}"}
        sweep.record_failure(out_dir, summary["error"])
    return {**summary, "run_dir": str(out_dir)}


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
    """Check what ``argv`` asks before Hydra starts; one UserError line. A single run: its
    config and its run directory; a multirun: the override grammar (jobs: the sweeper)."""
    from meta_llr.config import compose

    modes = [a for a in argv if a in ("-m", "--multirun", "--cfg", "-c", "--info", "-i") or a.startswith(("--cfg=", "--info="))]
    if len(modes) > 1:
        raise UserError(f"{' and '.join(modes)} cannot be combined; give one of them")
    if any(a in ("--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--shell-completion", "-sc")
           or a.startswith(("--cfg=", "--info=")) for a in argv):
        return
    deleted = [a for a in argv if a.startswith("~") and not a[1:].startswith("hydra")]
    if deleted:
        raise UserError(f"{deleted[0]} deletes an option, which the typed config keeps; set it instead "
                        f"({deleted[0][1:].split('=')[0]}=VALUE)")
    try:
        jobs = job_overrides(argv)
    except Exception as error:  # a malformed override: Hydra's parser says what is wrong
        raise UserError(f"bad override: {str(error).splitlines()[0]}") from None
    if any(a in ("-m", "--multirun") for a in argv):
        return
    compose(jobs[0])
    check_writable(run_dir_of(argv), "hydra.run.dir")


def run_dir_of(argv: list[str]) -> Path:
    """The run directory Hydra will create for a single run of ``argv``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    overrides = [a for a in argv if not a.startswith("-") and "=" in a]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(version_base="1.3", config_module="meta_llr.conf"):
            cfg = hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        return Path(str(OmegaConf.select(cfg, "hydra.run.dir")))
    finally:
        GlobalHydra.instance().clear()


def check_writable(directory: Path, option: str) -> None:
    """``directory`` is, or can be made, a directory we can write (made here, as Hydra would
    make it next); else one UserError line."""
    import tempfile

    try:
        directory.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=directory).close()
    except OSError as error:
        raise UserError(f"{option}={directory} cannot be written ({error.strerror or error}); "
                        f"choose another {option}") from None


def main() -> None:
    import hydra

    from meta_llr.config import register_configs

    try:
        register_configs()
        check_argv(sys.argv[1:])
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    from meta_llr import sweep

    try:
        hydra.main(version_base="1.3", config_path="pkg://meta_llr.conf", config_name="config")(_hydra_main)()
    except Interrupted as stop:
        sys.exit(stop.exit_code)
    if sweep.last_counts["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
