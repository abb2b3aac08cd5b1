"""The run configuration: typed sections, registered in Hydra's ConfigStore, composed and checked.

One dataclass per section, each option declared once with its default and range
(:func:`meta_llr.options.opt`): :class:`TrainerConfig`, :class:`LayersConfig`,
:class:`DiagnosticsConfig`, :class:`WandbConfig`, :class:`PathsConfig` here, and beside their
code the groups ``controller`` (:mod:`meta_llr.registry`), ``model`` (:mod:`meta_llr.models`),
``data`` (:mod:`meta_llr.data`) and ``schedule`` (:mod:`meta_llr.schedules`). The primary
``meta_llr/conf/config.yaml`` only lists the default of each group and Hydra's own settings.

:func:`compose` gives the resolved config of a list of command-line overrides, checked:
OmegaConf checks types while composing, :func:`validate` the ranges and cross-field rules;
both fail with one :class:`~meta_llr.errors.UserError` line. The CLI, the Python API and the
tests use it; Hydra's own ``@main`` composes the same tree.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from meta_llr.errors import UserError, one_line_config_error
from meta_llr.options import check_section, fail, opt

GROUPS = ("controller", "model", "data", "schedule")
# Keys that change neither what a run computes nor what it records (a resume may change them;
# they do not name a different run).
FREE_KEYS = ("quiet", "logger", "wandb", "paths", "hydra", "device", "trainer.resume", "trainer.checkpoint")


@dataclass
class TrainerConfig:
    """``trainer``: the loop's options.

    Evaluations: at the end of every ``eval_every``-th epoch and of the last epoch, and with
    ``eval_every_steps=N`` also after every N-th step (counted over the whole run). An
    evaluation inside an epoch writes a ``metrics.jsonl`` row whose ``epoch`` is the fraction
    of training done, ``step / steps_per_epoch`` (a float, e.g. 2.5), and whose ``train_loss``
    and ``train_acc`` cover the steps since the previous evaluation; an evaluation at the end
    of an epoch keeps the integer epoch. ``layer_stats.csv`` and the curvature probe stay per
    epoch (their statistics are taken at an epoch's last step). Without ``eval_every_steps``
    the rows are exactly those of before.

    Training loss: at every ``log_every``-th step and at the last step (the log points) the
    mean training loss of the interval since the previous log point is kept on the device and
    written to ``train_loss.csv`` (``step, epoch, train_loss, lr``; ``epoch`` the fraction
    ``step / steps_per_epoch``, ``lr`` the global LR of the interval's last step) at every
    evaluation and at the end, one row per log interval.

    Divergence, checked at the log points (one host transfer each) and at the end of every
    epoch: the run stops with status ``diverged`` and ``reason`` ``non_finite`` when the
    training loss is NaN or infinite, or ``loss_explosion`` when a log interval's mean
    training loss (or, at an epoch end, the open interval's) exceeds ``divergence_factor``
    times ``min(first interval's mean, ln(num_classes))``.
    """

    section: ClassVar[str] = "trainer"
    epochs: int = opt(10, ge=1, doc="passes over the training set")
    batch_size: int = opt(128, ge=1)
    lr: float = opt(0.05, gt=0, doc="base LR: global_lr(t) = lr * schedule(t)")
    optimizer: str = opt("sgd", choices=("sgd", "adamw"), doc="sgd (momentum, Nesterov) | adamw")
    momentum: float = opt(0.9, ge=0, lt=1, doc="SGD momentum")
    nesterov: bool = opt(True, free=True, doc="Nesterov momentum (when momentum > 0)")
    betas: list[float] = opt([0.9, 0.999], ge=0, lt=1, length=(2, 2), doc="AdamW only")
    weight_decay: float = opt(5.0e-4, ge=0)
    decay_1d: bool = opt(True, free=True, doc="weight decay on biases and norm parameters too")
    norm_lr_mult: float = opt(1.0, gt=0, doc="LR multiplier of normalisation layers' parameters (BatchNorm shifts), "
                                             "their decay divided by it (airbench's bias scaler, 64)")
    label_smoothing: float = opt(0.0, ge=0, lt=1)
    ema_every: int = opt(0, ge=0, doc="N > 0: every N steps average the weights and reset to the average "
                                      "(meta_llr.weight_average, airbench's lookahead); 0: off")
    ema_decay: float = opt(0.95, ge=0, lt=1, doc="per-step decay of that average (raised to ema_every)")
    ema_start: int = opt(0, ge=0, doc="epochs trained before that average starts (airbench: 3)")
    tta: int = opt(0, choices=(0, 1, 2), doc="test-time augmentation at evaluation: 0 none, 1 mirror, "
                                             "2 mirror and 1-pixel translations (Run.evaluate)")
    eval_every: int = opt(1, ge=1, doc="epochs between evaluations (the last epoch is always evaluated)")
    eval_batch_size: int = opt(1024, ge=1)
    eval_every_steps: Optional[int] = opt(None, ge=1, nullable=True,
                                          doc="N: also evaluate after every N-th step (null: per epoch only)")
    log_every: int = opt(50, ge=1, doc="steps between progress updates, train_loss.csv rows and divergence checks")
    divergence_factor: float = opt(20.0, gt=1, doc="diverged (loss_explosion) when a log interval's mean "
                                                   "training loss exceeds this times min(the first "
                                                   "interval's, ln(classes))")
    trace_every: Optional[int] = opt(None, ge=1, nullable=True, doc="steps between llr.csv rows; null: >= 200 rows")
    precision: str = opt("auto", choices=("auto", "fp32", "bf16"), doc="auto: bf16 autocast on CUDA, fp32 on CPU")
    compile: bool = opt(False, free=True, doc="torch.compile the model")
    checkpoint: bool = opt(True, free=True, doc="write checkpoint-<step>.pt (+ .sha256; the last two kept) "
                                                "after every epoch and on SIGTERM/SIGINT/SIGUSR1")
    resume: Any = opt(False, choices=(False, True, "auto"),
                      doc="continue the run in the run dir (auto: if there is one, else start; "
                          "false: refuse a dir that holds a run; true: refuse one that does not)")

    def validate(self):
        if not (isinstance(self.resume, bool) or self.resume == "auto"):  # 1 == True: the choices alone admit it
            fail("trainer.resume", self.resume, "one of false, true, auto")


@dataclass
class LayersConfig:
    section: ClassVar[str] = "layers"
    groups: int = opt(0, ge=0, doc="K > 0 merges the layers into K contiguous depth groups")


@dataclass
class DiagnosticsConfig:
    section: ClassVar[str] = "diagnostics"
    rotation: bool = opt(True, free=True, doc="layer rotation (one copy of the initial kernels)")
    curvature_every: int = opt(0, ge=0, doc="N > 0: every N epochs, exact curvature along each layer's step")


@dataclass
class WandbConfig:
    section: ClassVar[str] = "wandb"
    project: str = opt("meta_llr", free=True)
    entity: Optional[str] = opt(None, free=True)
    group: Optional[str] = opt(None, free=True, doc="null: the study")
    job_type: Optional[str] = opt(None, free=True, doc="null: the controller name")
    tags: Optional[list[str]] = opt(None, free=True, doc="null: [controller, model, data]")
    mode: Optional[str] = opt(None, choices=("online", "offline", "disabled"), nullable=True,
                              doc="null: WANDB_MODE, else online with an API key and offline without")
    dir: Optional[str] = opt(None, free=True, doc="null: WANDB_DIR, else the run directory")
    init_timeout: float = opt(20.0, gt=0, doc="seconds before an online start gives up and logs offline")


@dataclass
class PathsConfig:
    section: ClassVar[str] = "paths"
    root: str = opt("runs", free=True, doc="runs/<study>/<run> is where records go")


@dataclass
class Config:
    """The whole run. ``controller``, ``model``, ``data`` and ``schedule`` are chosen by name
    (``controller=NAME``) from their ConfigStore groups."""

    section: ClassVar[str] = ""
    controller: Any = MISSING
    model: Any = MISSING
    data: Any = MISSING
    schedule: Any = MISSING
    study: str = opt("default", free=True, doc="runs/<study>/... groups related runs")
    seed: int = opt(0, ge=0, le=2**31 - 1000, doc="the run's seed; its data order, augmentation and lookahead "
                                                   "streams take seed+1, seed+2 and replicas seed+i: room is left")
    replicas: int = opt(1, ge=1, le=256, doc="S > 1: S runs with seeds seed..seed+S-1 in one process (meta_llr.replicas)")
    device: str = opt("auto", free=True, doc="auto | cpu | cuda | cuda:N")
    quiet: bool = opt(False, free=True, doc="no progress bar or layer table (sweeps)")
    layers: LayersConfig = field(default_factory=LayersConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    logger: list[str] = opt(["csv"], choices=("csv", "wandb"), length=(1, 2), doc="csv (always) and optionally wandb")
    wandb: WandbConfig = field(default_factory=WandbConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)

    def validate(self):
        device = str(self.device)
        if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
            fail("device", device, "auto, cpu, cuda or cuda:N")
        if str(self.study) in ("", ".", "..") or "/" in str(self.study):
            fail("study", self.study, "a folder name: not empty, not . or .., without '/'")


def run_name(controller: str, model: str, data: str, seed, overrides: Iterable[str] = ()) -> str:
    """A sweep job's directory name, a function of what it computes (Hydra's
    ``hydra.sweep.subdir``, resolver ``meta_llr.run_name``): ``<controller>-<model>-<data>-s<seed>``,
    then the other overrides that change the computation, sorted (``-trainer.lr=0.1``), or,
    when they are long or not a safe file name, ``-h`` and 10 hex digits of their SHA-1.
    Overrides of :data:`FREE_KEYS`, ``seed`` and ``study`` are left out, and so is a group choice
    the prefix already names (``controller=depth_linear``); other group choices stay
    (``schedule=cosine``, a preset such as ``controller=fixed_linear_discussion``)."""
    named = {"controller": str(controller), "model": str(model), "data": str(data)}

    def names_the_run(override: str) -> bool:
        key, _, value = override.partition("=")
        key = key.lstrip("+~")
        if key in GROUPS:
            return named.get(key) != value
        return not (key in ("seed", "study") or any(key == k or key.startswith(k + ".") for k in FREE_KEYS))

    rest = sorted(o for o in map(str, overrides) if names_the_run(o))
    name = f"{controller}-{model}-{data}-s{seed}"
    if rest:
        text = ",".join(rest)
        readable = len(text) <= 80 and re.fullmatch(r"[A-Za-z0-9_.=,+~-]+", text)
        name += "-" + (text if readable else "h" + hashlib.sha1(text.encode()).hexdigest()[:10])
    return name


OmegaConf.register_new_resolver(
    "meta_llr.run_name", lambda c, m, d, s, overrides: run_name(c, m, d, s, list(overrides)), replace=True)

_registered = False


def register_configs() -> None:
    """Fill Hydra's ConfigStore: the root schema, every group's options (once per process)."""
    global _registered
    if _registered:
        return
    from meta_llr.data import SOURCES
    from meta_llr.registry import load_all, store
    from meta_llr.schedules import SCHEDULES

    import hydra_plugins.meta_llr_sweeper  # noqa: F401  (hydra/sweeper=meta_llr, the config's default)

    load_all()  # controllers and models register themselves (and their plugins)
    store(None, "base_config", Config)
    for name, config in SOURCES.items():
        store("data", name, config)
    for name, config in SCHEDULES.items():
        store("schedule", name, config)
    _registered = True


def group_options(group: str) -> list[str]:
    """The names ``group=NAME`` accepts: ConfigStore entries and YAML presets."""
    from importlib.resources import files

    from hydra.core.config_store import ConfigStore

    register_configs()
    names = {n[:-5] if n.endswith(".yaml") else n for n in ConfigStore.instance().list(group)}
    folder = files("meta_llr.conf").joinpath(group)
    if folder.is_dir():
        names |= {p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml")}
    return sorted(names)


def check_group_choices(overrides: Iterable[str]) -> None:
    """An unknown ``controller=``/``model=``/``data=``/``schedule=`` name: one line."""
    for arg in overrides:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+~")
        if sep and key in GROUPS:
            valid = group_options(key)
            for choice in value.split(","):
                choice = choice.strip()
                if choice and choice not in valid and not choice.startswith(("choice(", "range(", "glob(")):
                    raise UserError(f"unknown {key} '{choice}'; valid: {', '.join(valid)}")


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """The checked config for ``overrides`` (as on the command line, without Hydra's own
    ``hydra.*`` keys); bad input raises one UserError line."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    overrides = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    register_configs()
    check_group_choices(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(version_base="1.3", config_module="meta_llr.conf"):
            cfg = hydra_compose(config_name="config", overrides=list(overrides))
    except UserError:
        raise
    except Exception as error:  # Hydra/OmegaConf: a wrong type, an unknown key, a bad override
        raise one_line_config_error(error) from None
    finally:
        GlobalHydra.instance().clear()
    validate(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Every range and cross-field rule of the composed config, and the controller's own
    options (by building it once): one UserError line for the first problem."""
    from meta_llr.registry import build_controller

    check_section(cfg, Config, "")  # nested sections and the chosen groups' dataclasses too
    build_controller(cfg.controller)
