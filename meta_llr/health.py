"""``python -m meta_llr.health``: the controller health table (``docs/health.md``).

Runs every registered controller with its defaults (plus the overrides it ``requires``) in
each setting of ``meta_llr/studies/health.yaml`` over its seeds, then writes one table per
setting: final test accuracy mean ± sd over the finished runs, how many diverged (and why),
the difference to ``uniform`` in points, and the wall time per step relative to ``uniform``
(same machine, same setting; noisy on a shared CPU). A controller whose defaults diverge or
end more than ``max_drop`` below uniform on digits is marked ``FAILS``.

Runs live in ``<runs>/health/<setting>/<controller>-s<seed>/`` and are reused when their
``summary.json`` exists, so a rerun only fills holes (``--fresh`` starts over). Options:
``--settings a,b``, ``--controllers a,b``, ``--seeds N`` (first N of each setting's seeds),
``--cifar10-jpeg PATH`` (default ``../shared/data/cifar10-jpeg``), ``--runs DIR`` (default
``runs``), ``--out FILE`` (default ``docs/health.md``), ``--report-only``.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from importlib.resources import files
from pathlib import Path

import yaml

from meta_llr.errors import Interrupted, UserError
from meta_llr.runs import read_run

QUIET = ["quiet=true", "trainer.checkpoint=false", "device=cpu"]


def load_plan(path: str | None = None) -> dict:
    """The shipped health plan, or the YAML at ``path``; one UserError line when it is not one."""
    if path and not Path(path).is_file():
        raise UserError(f"--plan {path} is not a file; give a health YAML (the shipped one: "
                        f"meta_llr/studies/health.yaml)")
    text = Path(path).read_text() if path else files("meta_llr").joinpath("studies", "health.yaml").read_text()
    try:
        plan = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise UserError(f"--plan {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(plan, dict) or not isinstance(plan.get("settings"), dict) or not plan["settings"]:
        raise UserError(f"--plan {path} needs settings: a mapping of setting names to overrides and seeds "
                        f"(see meta_llr/studies/health.yaml)")
    return plan


def run_one(out: Path, overrides: list[str]) -> dict:
    """One run in this process (records in ``out``); a failure is recorded, never raised."""
    import meta_llr

    try:
        return meta_llr.fit(overrides=overrides, out_dir=out).summary
    except UserError as error:
        summary = {"status": "failed", "error": str(error)}
        (out / "summary.json").write_text(json.dumps(summary))
        return summary


def collect(plan: dict, settings: list[str], controllers: list[str], seeds: int | None, runs: Path,
            cifar10_jpeg: str, fresh: bool, execute: bool) -> dict:
    from meta_llr.registry import available

    registry = available()
    results = {}
    total = sum(len(plan["settings"][s]["seeds"][:seeds]) for s in settings) * len(controllers)
    done = 0
    started = time.perf_counter()
    for setting in settings:
        spec = plan["settings"][setting]
        base = [o.format(cifar10_jpeg=cifar10_jpeg) for o in spec["overrides"]]
        for name in controllers:
            cls = registry[name]
            for seed in spec["seeds"][:seeds]:
                out = runs / "health" / setting / f"{name}-s{seed}"
                summary_file = out / "summary.json"
                over = read_run(out).status in ("finished", "diverged")
                if out.exists() and (fresh or (execute and not over)):
                    shutil.rmtree(out)  # a killed, interrupted or failed run is a hole: train it again
                if not summary_file.exists() and execute:
                    out.mkdir(parents=True, exist_ok=True)
                    example = {k: v for k, v in cls.example_options(out).items()}
                    overrides = [*base, *cls.requires, f"controller={name}", f"seed={seed}", *QUIET,
                                 *(f"controller.{k}={v}" for k, v in example.items())]
                    run_one(out, overrides)
                done += 1
                if execute:
                    print(f"\r[{done}/{total}] {setting} {name} s{seed} "
                          f"({time.perf_counter() - started:.0f} s)", end="", file=sys.stderr, flush=True)
                if summary_file.exists():
                    results.setdefault(setting, {}).setdefault(name, []).append(json.loads(summary_file.read_text()))
    if execute:
        print(file=sys.stderr)
    return results


def _fmt(value: float | None, digits: int = 4) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def table(plan: dict, setting: str, rows: dict[str, list[dict]], controllers: list[str]) -> tuple[str, list[str]]:
    """The markdown table of one setting, and the controllers that fail the rule."""
    baseline = plan.get("baseline", "uniform")
    max_drop = float(plan.get("max_drop", 0.02))

    def finished(name):
        return [r for r in rows.get(name, []) if r.get("status") == "finished" and r.get("final_test_acc") is not None]

    def per_step(name):
        values = [r["wall_s"] / r["steps"] for r in finished(name) if r.get("steps")]
        return statistics.median(values) if values else None

    base_runs = finished(baseline)
    base_mean = statistics.fmean(r["final_test_acc"] for r in base_runs) if base_runs else None
    base_step = per_step(baseline)
    lines = ["| controller | runs | final test acc (mean ± sd) | diverged | Δ vs uniform (points) | "
             "time/step vs uniform | verdict |", "|---|---|---|---|---|---|---|"]
    failing = []
    for name in controllers:
        runs = rows.get(name, [])
        if not runs:
            continue
        ok = finished(name)
        accs = [r["final_test_acc"] for r in ok]
        mean = statistics.fmean(accs) if accs else None
        sd = statistics.stdev(accs) if len(accs) > 1 else None
        diverged = [r for r in runs if r.get("status") == "diverged"]
        failed = [r for r in runs if r.get("status") == "failed"]
        reasons = ", ".join(sorted({r.get("reason", "non_finite") for r in diverged}))
        delta = None if mean is None or base_mean is None else 100 * (mean - base_mean)
        step = per_step(name)
        ratio = None if step is None or not base_step else step / base_step
        bad = bool(diverged or failed) or (delta is not None and delta < -100 * max_drop) or mean is None
        if bad:
            failing.append(name)
        verdict = "FAILS" if bad else "ok"
        acc = f"{_fmt(mean)} ± {_fmt(sd)}" if mean is not None else "—"
        div = f"{len(diverged)}" + (f" ({reasons})" if reasons else "") + (f", {len(failed)} failed" if failed else "")
        lines.append(f"| `{name}` | {len(runs)} | {acc} | {div} | {_fmt(delta, 2) if delta is not None else '—'} | "
                     f"{_fmt(ratio, 2) if ratio is not None else '—'} | {verdict} |")
    return "\n".join(lines), failing


def sections(text: str) -> dict[str, str]:
    """The ``## name`` sections of a health table, by name (their body, heading excluded)."""
    out, name, body = {}, None, []
    for line in text.splitlines():
        if line.startswith("## "):
            if name:
                out[name] = "\n".join(body).strip()
            name, body = line[3:].strip(), []
        elif name:
            body.append(line)
    if name:
        out[name] = "\n".join(body).strip()
    return out


def report(plan: dict, results: dict, controllers: list[str], command: str, previous: dict | None = None) -> str:
    """The health table; a setting with no runs under ``--runs`` keeps its section of the
    previous table (``previous``: :func:`sections` of the file being replaced), marked so."""
    parts = [
        "# Controller health table",
        "",
        "Every registered controller and baseline with its defaults (plus the overrides it requires),",
        f"generated by `{command}` from `meta_llr/studies/health.yaml`. The rule: no controller's",
        f"defaults diverge or end more than {100 * float(plan.get('max_drop', 0.02)):g} points below `uniform` on digits.",
        "Time per step is wall time relative to `uniform` in the same setting on the machine that ran",
        "the table (a shared 2-core CPU here: ±20 % noise); the exact per-step cost of each controller is",
        "in docs/performance.md (kernel ops per step) and docs/controllers.md.",
        "",
    ]
    for setting, spec in plan["settings"].items():
        parts.append(f"## {setting}")
        parts.append("")
        parts.append(" ".join(str(spec.get("description", "")).split()))
        parts.append("")
        if setting not in results:
            kept = (previous or {}).get(setting, "")
            if "| controller |" in kept:
                body = kept.split("\n", 1)[1].strip() if kept.startswith(parts[-2]) else kept
                body = "\n".join(line for line in body.splitlines() if not line.startswith("(Kept from")).strip()
                parts += [f"(Kept from the previous table: its runs are not under this `--runs`; "
                          f"`python -m meta_llr.health --settings {setting}` regenerates it.)", "", body, ""]
            else:
                parts.append(f"Not run yet: `python -m meta_llr.health --settings {setting}`.")
                parts.append("")
            continue
        text, failing = table(plan, setting, results[setting], controllers)
        seeds = sorted({len(v) for v in results[setting].values()})
        parts.append(f"Seeds per controller: {', '.join(map(str, seeds))} (planned {len(spec['seeds'])}).")
        parts.append("")
        parts.append(text)
        parts.append("")
        if failing:
            parts.append(f"Failing the rule here: {', '.join(f'`{n}`' for n in failing)}.")
            parts.append("")
    if plan.get("notes"):
        parts += ["## Notes", "", str(plan["notes"]).strip(), ""]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    from meta_llr.registry import available

    parser = argparse.ArgumentParser(prog="python -m meta_llr.health", description=__doc__.splitlines()[0])
    parser.add_argument("--plan", default=None, help="a health YAML (default: the shipped one)")
    parser.add_argument("--settings", default=None)
    parser.add_argument("--controllers", default=None)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--out", default="docs/health.md")
    parser.add_argument("--cifar10-jpeg", default="../shared/data/cifar10-jpeg")
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    try:
        plan = load_plan(args.plan)
        settings = args.settings.split(",") if args.settings else list(plan["settings"])
        unknown = sorted(set(settings) - set(plan["settings"]))
        if unknown:
            raise UserError(f"unknown setting {', '.join(unknown)}; valid: {', '.join(plan['settings'])}")
        registry = available()
        controllers = args.controllers.split(",") if args.controllers else list(registry)
        missing = sorted(set(controllers) - set(registry))
        if missing:
            raise UserError(f"unknown controller {', '.join(missing)}; valid: {', '.join(registry)}")
        baseline = plan.get("baseline", "uniform")
        order = [baseline] + [c for c in controllers if c != baseline]
        if args.seeds is not None and args.seeds < 1:
            raise UserError(f"--seeds {args.seeds}: give N >= 1")
        collect(plan, settings, order, args.seeds, Path(args.runs), args.cifar10_jpeg, args.fresh,
                execute=not args.report_only)
        everything = collect(plan, list(plan["settings"]), list(registry), None, Path(args.runs),
                             args.cifar10_jpeg, False, execute=False)
        command = "python -m meta_llr.health" + (f" --settings {args.settings}" if args.settings else "")
        out = Path(args.out)
        previous = sections(out.read_text()) if out.is_file() else {}
        text = report(plan, everything, [baseline] + [c for c in registry if c != baseline], command, previous)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        print("interrupted; the finished runs are kept: run the same command again to train the rest",
              file=sys.stderr)
        return stop.exit_code
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
