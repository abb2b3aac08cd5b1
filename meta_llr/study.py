"""Preregistered studies: ``python -m meta_llr.study run|report|show|plan FILE [overrides...]``.

A study file (YAML; a name resolves to ``meta_llr/studies/NAME.yaml``) fixes the grid and the
hypotheses *before* any run::

    name: my_study                    # runs go to <root>/<name>/ (root: --root, default runs)
    description: why, and what we expect
    grid:
      model: shallow                  # every arm shares model, data, epochs, schedule, seeds
      data: digits
      epochs: 10
      schedule: step
      seeds: [0, 1, 2]
      overrides: [trainer.lr=0.05]    # optional, every run
      controllers:                    # the arms; label defaults to the controller name
        - {name: uniform}
        - {name: freezeout, seeds: [0, 1]}      # optional: this arm's own seeds (a descriptive arm)
        - {label: reversed, name: depth_linear, overrides: {controller.first: 0.5, controller.last: 1.5}}
    launcher: null                    # a Hydra launcher (joblib, submitit_slurm): hydra/launcher=...
    commands: [...]                   # optional: the command lines the report lists at its top
    discussion: my_study.md           # optional: a markdown file (beside this one) the report ends with
    baseline: uniform                 # the reference arm of the comparison tables
    metric: final_test_acc            # the metric of the comparison tables' tests
    target_acc: null                  # for steps/epochs to target (null: see meta_llr.compare)
    hypotheses:
      - id: H1
        claim: reversed LLR trains slower than uniform
        metric: loss_auc              # any meta_llr.compare metric
        comparison: reversed > uniform          # A < B, A > B, or |A - B| < margin
        baseline: uniform             # optional, default B: effect sizes are (other - baseline)
        alpha: 0.05                   # optional, default 0.05
        effect: 0.005                 # the smallest difference worth finding (equivalence: the margin)
        power: 0.8                    # optional, default 0.8: below it the verdict is "underpowered"

``run`` launches each arm as one Hydra multirun over the seeds (``python -m meta_llr.train -m
+arm=LABEL controller=... seed=0,1,2 ...``), skipping (arm, seed) pairs that already have a
finished or diverged run in the study folder (a divergence is a result: the same seed
diverges again; failed and incomplete runs are rerun; ``--force`` reruns them all, beside the
old runs, and ``report`` calls the grid exploratory until one run per seed is kept);
``--launcher NAME`` (or the file's ``launcher``) runs the jobs of an arm in parallel or on a
cluster; anything after the file is passed on as overrides (``device=cuda
trainer.compile=true``). ``--dry-run`` prints the commands. ``--seeds 100,101 --arms a,b
--root runs/pilot`` runs other seeds of some arms elsewhere: a pilot, which ``plan`` reads.

``report`` runs ``meta_llr.compare`` on the study folder and judges every hypothesis on the
finished runs, with Holm's correction across one family: every hypothesis's test of the claim
and of its opposite together (so the error rate per hypothesis stays at alpha). Diverged runs are left
out of every mean and test and counted per arm with their reasons (``4 runs, 1 diverged
(loss_explosion)``), in the comparison tables and beside each verdict; an arm whose mean final
test accuracy is within 1 point of chance is flagged (see :mod:`meta_llr.compare`):

* first the power: with the arms' pooled seed-to-seed spread ``s`` and ``n`` finished runs per
  arm (the smaller arm), the power of the test for the preregistered ``effect``
  (:func:`meta_llr.stats.power_t`, noncentral t; equivalence: :func:`meta_llr.stats.tost_power`
  at a true difference 0). Below ``power`` (default 0.8) the verdict is **underpowered (needs N
  seeds per arm)**, whatever the p-values say (a significant result at low power is reported
  beside it as exploratory); a hypothesis without ``effect`` gets no power and says so.
* ``A < B`` (``A > B``): one-sided Welch t-test. **supported** when its Holm-adjusted p is
  below alpha; **contradicted** when the opposite one-sided test is (A significantly above,
  resp. below, B); otherwise **inconclusive** (powered, and no difference found).
* ``|A - B| < margin``: equivalence by two one-sided Welch tests (TOST, Schuirmann 1987),
  ``p = max(p(A - B > -margin), p(A - B < margin))``: **supported** when below alpha;
  **contradicted** when ``|A - B| > margin`` is significant (the smaller of the two one-sided
  p-values, doubled); otherwise **inconclusive** (too few seeds to tell).
* fewer than 2 finished runs in an arm, or neither arm varies (every run of both the same
  value: Welch's t is undefined, p is NaN rather than a made-up 0 or 1): **inconclusive**, with
  the reason. The formulas and their sources: ``meta_llr.stats``.

``plan --pilot DIR`` sizes the study from pilot runs: per hypothesis, the seed spread, the seeds
per arm its preregistered effect needs, and the power of the file's seeds.

``report.md`` (next to ``compare.md``, ``compare.csv`` and the figures; ``--out FILE.md``: the
report there and the rest in ``FILE/``) gives per hypothesis the
verdict, the means, the difference with its 95% Welch interval, the deciding t statistic, raw
and Holm-adjusted p-values and Hedges' g. ``show`` prints the commands and the hypotheses.
"""
from __future__ import annotations

import argparse
import math
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import numpy as np
import yaml

from meta_llr.compare import METRICS, compare, markdown, write_outputs
from meta_llr.errors import UserError
from meta_llr.runs import find_runs
from meta_llr.stats import (detectable_effect, hedges_g, holm, iqm_ci, pooled_sd, power_t, seeds_needed, tost,
                            tost_power, welch, welch_interval, welch_note)

DIRECTIONAL = re.compile(r"^\s*([\w.-]+)\s*([<>])\s*([\w.-]+)\s*$")
EQUIVALENCE = re.compile(r"^\s*\|\s*([\w.-]+)\s*-\s*([\w.-]+)\s*\|\s*<\s*([0-9.eE+-]+)\s*$")


# ----------------------------------------------------------------------------- the study file

@dataclass
class Hypothesis:
    id: str
    claim: str
    metric: str
    kind: str            # "<", ">" or "equiv"
    a: str
    b: str
    margin: float | None
    baseline: str
    alpha: float
    text: str            # the comparison as written
    effect: float | None = None  # preregistered smallest difference worth finding (equiv: the margin)
    power: float = 0.8


def study_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.exists():
        return path
    shipped = files("meta_llr").joinpath("studies", f"{name_or_path}.yaml")
    if shipped.is_file():
        return Path(str(shipped))
    names = sorted(p.name[:-5] for p in files("meta_llr").joinpath("studies").iterdir() if p.name.endswith(".yaml"))
    raise UserError(f"study {name_or_path} not found; give a YAML path or a shipped study: {', '.join(names)}")


def load_study(name_or_path: str) -> dict:
    """Read and check a study file; UserError with one line naming the problem."""
    path = study_path(name_or_path)
    try:
        study = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise UserError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    where = f"study {path}"
    if not isinstance(study, dict) or not isinstance(study.get("grid"), dict):
        raise UserError(f"{where} needs a grid: mapping (see python -m meta_llr.study --help)")
    study.setdefault("name", path.stem)
    grid = study["grid"]
    for key in ("model", "data", "epochs", "seeds", "controllers"):
        if key not in grid:
            raise UserError(f"{where}: grid.{key} is missing")
    if not _seed_list(grid["seeds"]):
        raise UserError(f"{where}: grid.seeds must be a non-empty list of integers >= 0, e.g. [0, 1, 2]")
    if not isinstance(grid["controllers"], list):
        raise UserError(f"{where}: grid.controllers must be a list of arms (a name, or name: with label:, ...)")
    _overrides(grid.get("overrides"), f"{where}: grid.overrides")  # checked here, used by arm_command
    arms = {}
    for arm in grid["controllers"]:
        arm = {"name": arm} if isinstance(arm, str) else dict(arm) if isinstance(arm, dict) else {}
        if "name" not in arm:
            raise UserError(f"{where}: every grid.controllers entry needs name: CONTROLLER")
        label = str(arm.get("label", arm["name"]))
        if label in arms:
            raise UserError(f"{where}: two arms are labelled {label}; give each a distinct label")
        seeds = arm.get("seeds", grid["seeds"])
        if not _seed_list(seeds):
            raise UserError(f"{where}: arm {label} seeds must be a non-empty list of integers >= 0, e.g. [0, 1, 2]")
        overrides = _overrides(arm.get("overrides"), f"{where}: arm {label} overrides")
        arms[label] = {"name": arm["name"], "overrides": overrides, "seeds": seeds}
    study["arms"] = arms
    study.setdefault("baseline", next(iter(arms)))
    if study["baseline"] not in arms:
        raise UserError(f"{where}: baseline {study['baseline']} is not an arm ({', '.join(arms)})")
    hypotheses = study.get("hypotheses") or []
    if not isinstance(hypotheses, list) or not all(isinstance(h, dict) for h in hypotheses):
        raise UserError(f"{where}: hypotheses must be a list of mappings (id:, comparison: 'A > B', ...)")
    study["hypotheses"] = [parse_hypothesis(h, arms, where) for h in hypotheses]
    if study.get("discussion"):  # a markdown file the report ends with, beside the study file
        discussion = path.parent / str(study["discussion"])
        if not discussion.is_file():
            raise UserError(f"{where}: discussion {study['discussion']} is not a file beside the study file")
        study["discussion"] = str(discussion)
    study["path"] = str(path)
    return study


def _seed_list(node) -> bool:
    """A non-empty list of integers >= 0 (YAML booleans are not seeds)."""
    return isinstance(node, list) and bool(node) and all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in node)


def _overrides(node, what: str = "overrides") -> list[str]:
    """``KEY=VALUE`` strings from a mapping or a list; anything else is one UserError naming ``what``."""
    if node is None:
        return []
    if not isinstance(node, (dict, list)):
        raise UserError(f"{what} must be a mapping (key: value) or a list of KEY=VALUE, got {node!r}")
    if isinstance(node, dict):
        return [f"{k}={_value(v)}" for k, v in node.items()]
    return [str(v) for v in node]


def _value(v) -> str:
    if isinstance(v, list):
        return "[" + ",".join(_value(x) for x in v) + "]"
    if isinstance(v, bool):
        return str(v).lower()
    return "null" if v is None else str(v)


def parse_hypothesis(node: dict, arms: dict, where: str) -> Hypothesis:
    hid = str(node.get("id", "?"))
    text = str(node.get("comparison", ""))
    if (m := EQUIVALENCE.match(text)):
        a, b, margin, kind = m.group(1), m.group(2), float(m.group(3)), "equiv"
    elif (m := DIRECTIONAL.match(text)):
        a, kind, b, margin = m.group(1), m.group(2), m.group(3), None
    else:
        raise UserError(f"{where}: hypothesis {hid} comparison {text!r} must read 'A < B', 'A > B' "
                        "or '|A - B| < margin' with arm labels A and B")
    for arm in (a, b):
        if arm not in arms:
            raise UserError(f"{where}: hypothesis {hid} names arm {arm}, not in the grid ({', '.join(arms)})")
    metric = node.get("metric", "final_test_acc")
    baseline = node.get("baseline", b)
    if baseline not in (a, b):
        raise UserError(f"{where}: hypothesis {hid} baseline {baseline} must be {a} or {b}")
    alpha = node.get("alpha", 0.05)
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and 0 < alpha < 1):
        raise UserError(f"{where}: hypothesis {hid} alpha must lie in (0, 1), got {alpha!r}")
    alpha = float(alpha)
    if margin is not None and margin <= 0:
        raise UserError(f"{where}: hypothesis {hid} margin must be > 0")
    effect = node.get("effect", margin)
    if effect is not None and not (isinstance(effect, (int, float)) and effect > 0):
        raise UserError(f"{where}: hypothesis {hid} effect must be a number > 0 (the smallest difference worth "
                        f"finding, in the metric's units), got {effect!r}")
    power = node.get("power", 0.8)
    if not (isinstance(power, (int, float)) and 0 < power < 1):
        raise UserError(f"{where}: hypothesis {hid} power must lie in (0, 1), got {power!r}")
    return Hypothesis(hid, str(node.get("claim", "")), metric, kind, a, b, margin, baseline, alpha, text,
                      None if effect is None else float(effect), float(power))


# ----------------------------------------------------------------------------- run

def study_dir(study: dict, root: str | None) -> Path:
    return Path(root or study.get("root") or "runs") / study["name"]


def arm_command(study: dict, label: str, seeds, out: Path, launcher: str | None, extra: list[str],
                fresh: bool = False, replicas: int = 1) -> list[str]:
    """The multirun of one arm. Each run's directory is ``<arm>-s<seed>`` (relaunching resumes
    or skips it: meta_llr's sweeper runs jobs with ``trainer.resume=auto``); ``fresh`` adds a
    timestamp, so ``--force`` writes new runs beside the old ones. ``replicas=S``: one job
    training seeds ``seeds[0]`` … ``seeds[0]+S−1`` together (:mod:`meta_llr.replicas`), its
    runs in ``<arm>-s<seed>-r<S>/s<seed>``."""
    grid, arm = study["grid"], study["arms"][label]
    command = [sys.executable, "-m", "meta_llr.train", "-m", f"+arm={label}", f"controller={arm['name']}",
               f"model={grid['model']}", f"data={grid['data']}", f"trainer.epochs={grid['epochs']}"]
    if grid.get("schedule"):
        command.append(f"schedule={grid['schedule']}")
    command += _overrides(grid.get("overrides")) + arm["overrides"]
    command += [f"seed={','.join(str(s) for s in seeds)}", f"study={study['name']}", "quiet=true",
                f"hydra.sweep.dir={out}",
                "hydra.sweep.subdir=${arm}-s${seed}" + (f"-r{replicas}" if replicas > 1 else "")
                + ("-${now:%Y%m%d-%H%M%S}" if fresh else "")]
    if replicas > 1:
        command.append(f"replicas={replicas}")
    if launcher:
        command.append(f"hydra/launcher={launcher}")
    return command + list(extra)


DONE = ("finished", "diverged")


def done_pairs(out: Path) -> set[tuple[str, int]]:
    """(arm, seed) pairs with a finished or diverged run in the study folder."""
    if not out.is_dir():
        return set()
    try:
        runs = find_runs(out)
    except UserError:
        return set()
    return {(str(r.get("arm") or r.controller), int(r.get("seed", -1))) for r in runs if r.status in DONE}


def consecutive(seeds) -> list[list[int]]:
    """``[0, 1, 2, 5, 6]`` -> ``[[0, 1, 2], [5, 6]]``: the seed ranges one replicas job trains."""
    chunks: list[list[int]] = []
    for seed in sorted(int(s) for s in seeds):
        if chunks and seed == chunks[-1][-1] + 1:
            chunks[-1].append(seed)
        else:
            chunks.append([seed])
    return chunks


def run_study(study: dict, root=None, launcher=None, extra=(), force=False, dry_run=False,
              replicas: bool = False, seeds=None, arms=None) -> list[list[str]]:
    """Run the arms' missing seeds: one multirun per arm, or with ``replicas`` one
    ``replicas=S`` job per range of consecutive missing seeds. ``seeds`` and ``arms`` (lists)
    replace the file's, for a pilot in another ``root`` (its report is then exploratory)."""
    out = study_dir(study, root)
    launcher = launcher or study.get("launcher")
    done = set() if force else done_pairs(out)
    unknown = sorted(set(arms or ()) - set(study["arms"]))
    if unknown:
        raise UserError(f"--arms names {', '.join(unknown)}, not arms of {study['name']} ({', '.join(study['arms'])})")
    commands = []
    for label in arms or study["arms"]:
        seeds_of = seeds if seeds is not None else study["arms"][label]["seeds"]
        seeds_now = [s for s in seeds_of if (label, int(s)) not in done]
        if seeds_now and replicas:
            commands += [arm_command(study, label, chunk[:1], out, launcher, list(extra), fresh=force,
                                     replicas=len(chunk)) for chunk in consecutive(seeds_now)]
        elif seeds_now:
            commands.append(arm_command(study, label, seeds_now, out, launcher, list(extra), fresh=force))
    for command in commands:
        print("python " + shlex.join(command[1:]), flush=True)
        if not dry_run:
            result = subprocess.run(command)
            if result.returncode != 0:
                raise UserError(f"the sweep for arm {command[4][5:]} exited with status {result.returncode}; "
                                f"see the error above, then rerun (finished and diverged runs are skipped)")
    if not commands:
        print(f"every (arm, seed) of {study['name']} has a finished or diverged run in {out}; --force reruns them")
    return commands


# ----------------------------------------------------------------------------- report

def evaluate_hypothesis(h: Hypothesis, a, b) -> dict:
    """Raw one-sided p-values for the claim (support) and against it (contra), and the statistics."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    result = {"n_a": len(a), "n_b": len(b), "mean_a": a.mean() if len(a) else math.nan,
              "mean_b": b.mean() if len(b) else math.nan}
    if h.kind == "equiv":
        t, support, contra = tost(a, b, h.margin)
    else:
        claim = "less" if h.kind == "<" else "greater"
        t, support = welch(a, b, claim)
        _, contra = welch(a, b, "greater" if claim == "less" else "less")
    sign = 1 if h.baseline == h.b else -1  # effect sizes are (other - baseline)
    low, high = welch_interval(a, b)
    result.update(t=t, p_support=support, p_contra=contra, note=welch_note(a, b),
                  diff=sign * (result["mean_a"] - result["mean_b"]),
                  diff_ci=(low, high) if sign == 1 else (-high, -low),
                  hedges_g=hedges_g(a, b) * sign)
    result.update(power_of(h, pooled_sd(a, b), min(len(a), len(b)), abs(result["diff"])))
    return result


def power_of(h: Hypothesis, sd: float, n: int, observed: float = math.nan) -> dict:
    """The test's power for the preregistered effect at ``n`` per arm with spread ``sd``, the
    seeds per arm it needs, the smallest effect it detects now, and the seeds the observed
    difference would need (all at the hypothesis's alpha and power)."""
    side = "two-sided" if h.kind == "equiv" else "greater"
    equiv = h.kind == "equiv"
    out = {"sd": sd, "power": math.nan, "needs": None, "detectable": detectable_effect(sd, n, h.alpha, h.power, side),
           "needs_observed": None if equiv else seeds_needed(observed, sd, h.alpha, h.power, side)}
    if h.effect is not None:
        out["power"] = tost_power(h.effect, sd, n, h.alpha) if equiv else power_t(h.effect, sd, n, h.alpha, side)
        out["needs"] = seeds_needed(h.effect, sd, h.alpha, h.power, side, equivalence=equiv)
    return out


def judge(hypotheses: list[Hypothesis], comparison) -> list[dict]:
    """Every hypothesis in every setting of the comparison, with its verdict."""
    results = []
    for setting in comparison.settings:
        for h in hypotheses:
            groups = {}
            for label, g in setting.groups.items():
                arm = label.split(" [")[0]
                if arm in groups:  # never judge one of two differing configs silently
                    raise UserError(f"arm {arm} holds runs of differing configs in setting {setting.title} "
                                    f"({', '.join(k for k in setting.groups if k.split(' [')[0] == arm)}); "
                                    f"remove the stray runs from the study folder or give them another arm label")
                groups[arm] = g
            a, b = groups.get(h.a), groups.get(h.b)
            if a is None and b is None:  # a setting without the hypothesis's arms (e.g. runs still going)
                continue
            values_a = a.metric(h.metric) if a else np.array([])
            values_b = b.metric(h.metric) if b else np.array([])
            result = {"hypothesis": h, "setting": setting.title, **evaluate_hypothesis(h, values_a, values_b)}
            result["left_out"] = [f"{label} {g.describe()}" for label, g in ((h.a, a), (h.b, b))
                                  if g is not None and len(g.runs) > g.counts()["finished"]]
            result["at_chance"] = [label for label, g in ((h.a, a), (h.b, b)) if g is not None and g.near_chance()]
            results.append(result)
    # One family: the claim's and the opposite's test of every hypothesis, adjusted together.
    adjusted = holm([r[key] for r in results for key in ("p_support", "p_contra")])
    for i, result in enumerate(results):
        result["p_support_holm"], result["p_contra_holm"] = adjusted[2 * i], adjusted[2 * i + 1]
    for r in results:
        h = r["hypothesis"]
        significant = ("the claim" if r["p_support_holm"] < h.alpha else
                       "the opposite" if r["p_contra_holm"] < h.alpha else None)
        if min(r["n_a"], r["n_b"]) < 2:
            r["verdict"], r["why"] = "inconclusive", f"fewer than 2 finished runs with {h.metric} in an arm"
        elif r["note"]:
            r["verdict"], r["why"] = "inconclusive", f"{h.metric}: {r['note']}"
        elif h.effect is not None and not r["power"] >= h.power:
            needs = f"needs {r['needs']} seeds per arm" if r["needs"] else "needs more seeds than can be run"
            r["verdict"] = f"underpowered ({needs})"
            r["why"] = (f"power {_g(r['power'], 2)} < {h.power} for the preregistered effect {h.effect:g} at n = "
                        f"{min(r['n_a'], r['n_b'])} with seed spread {_g(r['sd'], 3)}"
                        + (f"; {significant} is significant (Holm p "
                           f"{_g(min(r['p_support_holm'], r['p_contra_holm']))}), exploratory at this power"
                           if significant else ""))
        elif r["p_support_holm"] < h.alpha:
            r["verdict"], r["why"] = "supported", f"Holm p {r['p_support_holm']:.3g} < alpha {h.alpha}"
        elif r["p_contra_holm"] < h.alpha:
            r["verdict"], r["why"] = "contradicted", f"the opposite is significant (Holm p {r['p_contra_holm']:.3g})"
        else:
            power = (f" with power {_g(r['power'], 2)} for the preregistered effect {h.effect:g}"
                     if h.effect is not None else " (no preregistered effect: its power is unknown)")
            r["verdict"], r["why"] = "inconclusive", (f"neither the claim (Holm p {_g(r['p_support_holm'])}) "
                                                      f"nor its opposite (Holm p {_g(r['p_contra_holm'])}) "
                                                      f"is significant at {h.alpha}{power}" + _excludes(h, r))
    return results


def _excludes(h: Hypothesis, r: dict) -> str:
    """For a powered directional hypothesis left inconclusive: whether the 95 % Welch interval
    of the difference (unadjusted) already rules out its preregistered effect in the claimed
    direction, i.e. any effect that way is smaller than the one worth finding."""
    if h.kind == "equiv" or h.effect is None:
        return ""
    low, high = r["diff_ci"]                              # of (other − baseline)
    negative = (h.kind == "<") == (h.baseline == h.b)     # the claim: that difference is negative
    if not (math.isfinite(low) and math.isfinite(high)) or not (low > -h.effect if negative else high < h.effect):
        return ""
    return (f"; its 95 % interval [{_g(low)}, {_g(high)}] (unadjusted) excludes the preregistered effect "
            f"{'−' if negative else '+'}{h.effect:g}: an effect in the claimed direction, if any, is smaller")


def _shown(path: str) -> str:
    """A path relative to the working directory when it lies below it (reports kept in a repo)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path


def _g(value, digits: int = 3) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.{digits}g}"


def grid_differences(study: dict, runs) -> list[str]:
    """How the finished and diverged runs depart from the study file's grid: epochs, model,
    data, and the seeds of each arm (missing, extra, or run more than once, which ``run
    --force`` leaves beside the old runs and would count twice). Empty: the preregistered grid."""
    grid, out = study["grid"], []
    done = [r for r in runs if r.status in DONE]
    for key, want in (("trainer.epochs", grid["epochs"]), ("model.name", grid["model"]), ("data.name", grid["data"])):
        found = sorted({str(r.get(key)) for r in done} - {str(want)})
        if found:
            out.append(f"{key} {', '.join(found)} (the file: {want})")
    for label, arm in study["arms"].items():
        want_seeds = {int(s) for s in arm["seeds"]}
        found = [int(r.get("seed", -1)) for r in done if str(r.get("arm") or r.controller) == label]
        seeds = set(found)
        twice = sorted(seed for seed in seeds if found.count(seed) > 1)
        if seeds != want_seeds or twice:
            missing, extra = sorted(want_seeds - seeds), sorted(seeds - want_seeds)
            out.append(f"arm {label}: seeds " + "; ".join(
                part for part in (f"missing {missing}" if missing else "", f"extra {extra}" if extra else "",
                                  f"run more than once {twice} (keep one run per seed)" if twice else "") if part))
    return out


def report_text(study: dict, results: list[dict], comparison_md: str, differences: list[str] = (),
                arm_values: dict | None = None) -> str:
    grid = study["grid"]
    if differences:  # judged on another grid than the preregistered one: say so first
        lines = [f"# Study {study['name']}: EXPLORATORY report (not the preregistered grid)\n",
                 "The runs depart from the study file, so the verdicts below are exploratory: "
                 + "; ".join(differences) + ".\n"]
    else:
        lines = [f"# Study {study['name']}: preregistered hypotheses\n"]
    if study.get("commands"):
        lines += ["The commands that made every number below, in order:\n", "```bash",
                  *[str(c) for c in study["commands"]], "```\n"]
    if study.get("description"):
        lines.append(" ".join(str(study["description"]).split()) + "\n")
    arms = "; ".join(f"{label} = {arm['name']} {' '.join(arm['overrides'])}".strip()
                     + ("" if arm["seeds"] == grid["seeds"] else f" (seeds {arm['seeds']})")
                     for label, arm in study["arms"].items())
    lines.append(f"Grid: model {grid['model']}, data {grid['data']}, {grid['epochs']} epochs, schedule "
                 f"{grid.get('schedule', 'step')}, seeds {grid['seeds']}; arms: {arms}. Study file: "
                 f"`{_shown(study['path'])}`.\n")
    lines.append("Verdicts: one-sided Welch t-tests (equivalence: two one-sided tests), Holm-corrected in one "
                 "family (every claim and its opposite); a test with less than its preregistered power for the "
                 "preregistered effect is **underpowered**, whatever its p; else supported / contradicted (the "
                 "opposite is significant) / inconclusive. Power: noncentral t with the arms' pooled seed spread "
                 "(sd); detectable: the smallest difference found with that power at this n.\n")
    lines.append("| id | claim | metric | comparison | verdict | means (A, B) | diff vs baseline [95% CI] "
                 "| t | p | p (Holm) | Hedges' g | n (A, B) | sd | power (effect) | seeds needed | detectable |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        h = r["hypothesis"]
        low, high = r["diff_ci"]
        lines.append(
            f"| {h.id} | {h.claim} | {h.metric} | `{h.text.replace('|', chr(92) + '|')}` "
            f"(baseline {h.baseline}, α {h.alpha}) "
            f"| **{r['verdict']}** | {_g(r['mean_a'], 4)}, {_g(r['mean_b'], 4)} "
            f"| {_g(r['diff'], 3)} [{_g(low, 3)}, {_g(high, 3)}] | {_g(r['t'])} | {_g(r['p_support'])} "
            f"| {_g(r['p_support_holm'])} | {_g(r['hedges_g'])} | {r['n_a']}, {r['n_b']} | {_g(r['sd'])} "
            f"| {_g(r['power'], 2)} ({_g(h.effect) if h.effect is not None else '—'}) "
            f"| {r['needs'] or '—'} | {_g(r['detectable'])} |")
    lines.append("")
    for r in results:
        extra = ""
        if r.get("left_out"):
            extra += f" Left out of the means: {'; '.join(r['left_out'])}."
        if r.get("at_chance"):
            extra += f" At chance (mean final test accuracy within 1 point of it): {', '.join(r['at_chance'])}."
        lines.append(f"- **{r['hypothesis'].id}** ({r['setting']}): {r['verdict']}: {r['why']}.{extra}")
    lines += aggregate_lines(study.get("metric", "final_test_acc"), arm_values or {})
    if study.get("discussion"):
        lines += ["", Path(study["discussion"]).read_text().strip()]
    lines.append("\n---\n")
    return "\n".join(lines) + "\n" + comparison_md


def aggregate_lines(metric: str, values: dict[str, list[float]]) -> list[str]:
    """Per arm, the interquartile mean of ``metric`` over every finished run of every setting,
    with a 95 % bootstrap interval (rliable's aggregate; meta_llr.stats.iqm_ci)."""
    if not values:
        return []
    lines = ["", f"Aggregate over every setting: interquartile mean of `{metric}` per arm with its 95 % "
             "percentile-bootstrap interval (rliable's recommendation; 2,000 resamples, seed 0).", "",
             "| arm | runs | IQM [95% CI] |", "|---|---|---|"]
    for arm, xs in values.items():
        iqm, low, high = iqm_ci(xs)
        lines.append(f"| {arm} | {len(xs)} | {_g(iqm, 4)} [{_g(low, 4)}, {_g(high, 4)}] |")
    return lines


def report_study(study: dict, root=None, figures: bool = True, to: str | Path | None = None) -> tuple[Path, list[dict]]:
    """Judge the study and write ``report.md`` with compare's tables and figures into the study
    folder, or with ``to=FILE.md`` the report at FILE.md and the rest in the folder FILE/ beside
    it (a report kept in the repository, e.g. docs/studies/NAME.md)."""
    out = study_dir(study, root)
    if not out.is_dir():
        raise UserError(f"no runs for study {study['name']} in {out}; run python -m meta_llr.study run "
                        f"{study['path']} first (or give --root)")
    runs = find_runs(out)
    for h in study["hypotheses"]:
        if h.metric not in METRICS and not any(h.metric in r.summary for r in runs):
            raise UserError(f"hypothesis {h.id} uses metric {h.metric}, which the runs do not have; "
                            f"use one of {', '.join(METRICS)}")
    comparison = compare(runs, baseline=study["baseline"], metric=study.get("metric", "final_test_acc"),
                         target=study.get("target_acc"))
    assets = out if to is None else Path(to).with_suffix("")
    drawn = write_outputs(comparison, assets, title=f"Comparison for study {study['name']}", figures=figures)
    if to is not None:  # the report sits beside its folder of figures
        drawn = {title: [f"{assets.name}/{name}" for name in names] for title, names in drawn.items()}
    results = judge(study["hypotheses"], comparison)
    metric = study.get("metric", "final_test_acc")
    arm_values = {}
    for setting in comparison.settings:
        for label, group in setting.groups.items():
            arm_values.setdefault(label.split(" [")[0], []).extend(group.metric(metric).tolist())
    differences = grid_differences(study, runs)
    path = out / "report.md" if to is None else Path(to)
    path.write_text(report_text(study, results, markdown(comparison, drawn, "Comparison"), differences, arm_values))
    return path, results


def plan_study(study: dict, pilot: str | Path) -> str:
    """Size the study from pilot runs (any run directories with the study's arms, e.g. a
    ``study run`` with 3 seeds): per hypothesis and setting, the pilot's pooled seed spread,
    the seeds per arm the preregistered effect needs at its alpha and power, and the power the
    study file's seeds would have. A table (markdown)."""
    runs = find_runs(Path(pilot))
    comparison = compare(runs, baseline=study["baseline"], metric=study.get("metric", "final_test_acc"),
                         target=study.get("target_acc"))
    lines = [f"# Plan for study {study['name']} from the pilot {pilot}", "",
             "| id | setting | metric | effect | pilot n (A, B) | seed spread (sd) | seeds per arm needed "
             "| the file's seeds per arm | power with them |", "|---|---|---|---|---|---|---|---|---|"]
    for setting in comparison.settings:
        groups = {label.split(" [")[0]: g for label, g in setting.groups.items()}
        for h in study["hypotheses"]:
            if h.a not in groups and h.b not in groups:  # as in judge: a setting without these arms
                continue
            a, b = (groups[arm].metric(h.metric) if arm in groups else np.array([]) for arm in (h.a, h.b))
            sd = pooled_sd(a, b)
            planned = min(len(study["arms"][arm]["seeds"]) for arm in (h.a, h.b))
            planned_power = power_of(h, sd, planned)["power"]
            needs = power_of(h, sd, max(len(a), 2))["needs"]
            lines.append(f"| {h.id} | {setting.title} | {h.metric} | {_g(h.effect) if h.effect else '— (none given)'} "
                         f"| {len(a)}, {len(b)} | {_g(sd)} | {needs or '—'} | {planned} | {_g(planned_power, 2)} |")
    lines += ["", "Power: two-sample t (noncentral t; equivalence: TOST) with the pilot's pooled spread, "
              "meta_llr.stats. A pilot of 3 seeds estimates the spread loosely: plan with margin."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line

def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of seeds, e.g. 100,101,102") from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meta_llr.study", description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=("run", "report", "show", "plan"))
    parser.add_argument("study", help="study YAML path, or the name of a shipped study")
    parser.add_argument("overrides", nargs="*", help="extra training overrides for run (e.g. device=cuda)")
    parser.add_argument("--root", default=None, help="folder holding study folders (default: runs)")
    parser.add_argument("--launcher", default=None, help="Hydra launcher, e.g. joblib or submitit_slurm")
    parser.add_argument("--force", action="store_true",
                        help="rerun (arm, seed) pairs that already finished (beside the old runs: keep one per seed "
                             "before report)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--pilot", default=None, help="plan: a folder of pilot runs of the study's arms")
    parser.add_argument("--out", default=None,
                        help="report: write it to this FILE.md, its tables and figures into FILE/ (default: the study folder)")
    parser.add_argument("--seeds", default=None, type=_int_list,
                        help="run: these seeds (e.g. 100,101,102) instead of the file's, for a pilot (give --root)")
    parser.add_argument("--arms", default=None, type=lambda text: [a for a in text.split(",") if a],
                        help="run: only these arms (labels, comma-separated)")
    parser.add_argument("--replicas", action="store_true",
                        help="run: each arm's consecutive missing seeds as one replicas=S job (meta_llr.replicas)")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    try:
        study = load_study(args.study)
        if args.action == "show":
            run_study(study, args.root, args.launcher, args.overrides, force=True, dry_run=True)
            for h in study["hypotheses"]:
                print(f"{h.id}: {h.claim} [{h.metric}: {h.text}, alpha {h.alpha}]")
        elif args.action == "plan":
            if not args.pilot:
                raise UserError("study plan needs --pilot DIR: a folder of pilot runs (e.g. a study run with 3 seeds)")
            print(plan_study(study, args.pilot))
        elif args.action == "run":
            run_study(study, args.root, args.launcher, args.overrides, args.force, args.dry_run, args.replicas,
                      args.seeds, args.arms)
        else:
            path, results = report_study(study, args.root, to=args.out)
            for r in results:
                print(f"{r['hypothesis'].id}: {r['verdict']} ({r['why']})")
            print(f"-> {path}")
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
