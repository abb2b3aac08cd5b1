"""Meta-train ``rnn_meta`` across whole runs with evolution strategies.

Evolution strategies (Salimans et al. 2017, arXiv 1703.03864), antithetic: with the learner's
flat weights ``φ`` and, per iteration, ``pairs`` draws ``ε_i ~ N(0, I)`` each on its own task
(model × data × seed), ::

    f±_i = F(φ ± σ·ε_i; task_i)          F: validation loss at the end of a short run
    d_i  = (f+_i − f−_i) / ((f+_i + f−_i)/2)     (relative: every task weighs the same)
    ĝ    = Σ_i d_i·ε_i / (2σ·pairs),     φ ← Adam(φ, ĝ)

Whole runs are evaluated, so there is no truncation bias (Metz et al. 2019, arXiv
1810.10180), at the price of variance. Runs use ``controller=rnn_meta controller.learn=off``
(frozen learner); a diverged or non-finite run scores ``--max-loss``. Evaluations run in
``--workers`` processes (``concurrent.futures`` with ``spawn``), or, with ``--launcher NAME``,
through the same Hydra launchers as sweeps (``basic``, ``joblib``, ``submitit_slurm``, ...):
each iteration writes its candidates' weights to files and launches one multirun per task
over them (:func:`launch_jobs`).
Every iteration writes ``weights.pt`` (plug into ``controller=rnn_meta controller.learn=off
controller.weights=OUT/weights.pt``), appends one line to ``metatrain.jsonl`` and checkpoints
``metatrain_state.pt``; ``--resume`` continues exactly::

    python -m meta_llr.metatrain --out runs/meta --iterations 30 --pairs 4 --workers 2 \\
        --task "model=shallow data=digits" --task "model=mlp data=digits" --seeds 0,1 \\
        --epochs 2

The k-step lookahead meta-gradient of ``learn=unrolled`` is
:func:`meta_llr.lookahead.unrolled_hypergradient`, a library module.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from meta_llr.errors import UserError
from meta_llr.records import save_atomic, write_atomic

STATE, LOG, WEIGHTS = "metatrain_state.pt", "metatrain.jsonl", "weights.pt"


# ---------------------------------------------------------------------- one task = one short run
def _compose(overrides: list[str]):
    from meta_llr.config import compose

    try:
        return compose(overrides)
    except UserError as error:
        raise UserError(f"bad task overrides {' '.join(overrides)}: {error}") from None


def run_objective(flat: np.ndarray, overrides: list[str], max_loss: float) -> float:
    """Validation loss after a short run (Hydra ``overrides``) with the frozen learner ``flat``:
    an ordinary run (divergence checks, records in a temporary directory), its learner given."""
    from meta_llr.registry import build_controller
    from meta_llr.run import build_run

    cfg = _compose(overrides)
    if not cfg.data.val_size:
        raise UserError("meta-training needs a validation split; add --val-size N (N > 0)")
    controller = build_controller(cfg.controller)
    controller.load_flat(torch.as_tensor(flat))  # before setup: its first output comes from these weights
    with tempfile.TemporaryDirectory() as out:
        summary = build_run(cfg, out, controller=controller).fit()
    loss = summary.get("final_val_loss")
    if summary["status"] != "finished" or loss is None:
        return max_loss
    return loss if math.isfinite(loss) and loss < max_loss else max_loss


def launch_jobs(jobs: list, folder: Path, launcher: str, save_weights) -> list[float]:
    """Score ``(theta, (overrides, max_loss))`` jobs with ``python -m meta_llr.train -m``: one
    Hydra multirun per task over the candidates' weight files, through ``hydra/launcher``."""
    from meta_llr.records import read_jsonl

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for j, (theta, _) in enumerate(jobs):
        paths.append((folder / f"candidate{j}.pt").resolve())
        save_weights(theta, paths[-1])
    by_task: dict[tuple, list[int]] = {}
    for j, (_, (overrides, _max_loss)) in enumerate(jobs):
        by_task.setdefault(tuple(overrides), []).append(j)
    values = [0.0] * len(jobs)
    for t, (overrides, members) in enumerate(by_task.items()):
        sweep = folder / f"task{t}"
        command = [sys.executable, "-m", "meta_llr.train", "-m", *overrides,
                   "controller.weights=" + ",".join(str(paths[j]) for j in members),
                   f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.num}"]
        if launcher != "basic":
            command.append(f"hydra/launcher={launcher}")
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"launching with hydra/launcher={launcher} failed: {last}")
        for k, j in enumerate(members):  # job k of the sweep ran weights members[k]
            run, max_loss = sweep / str(k), jobs[j][1][1]
            summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
            metrics = read_jsonl(run / "metrics.jsonl") if (run / "metrics.jsonl").exists() else []
            loss = metrics[-1].get("val_loss") if metrics and summary.get("status") == "finished" else None
            values[j] = loss if loss is not None and math.isfinite(loss) else max_loss
    shutil.rmtree(folder, ignore_errors=True)  # the runs are scored; keep only the ES log
    return values


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------- evolution strategies
class ES:
    """Antithetic ES with Adam on the mean; all state in ``state_dict()``."""

    def __init__(self, theta: np.ndarray, sigma: float, lr: float, pairs: int, seed: int):
        self.theta = np.asarray(theta, dtype=np.float64).copy()
        self.sigma, self.lr, self.pairs, self.seed = sigma, lr, pairs, seed
        self.m = np.zeros_like(self.theta)
        self.v = np.zeros_like(self.theta)
        self.iteration = 0

    def ask(self, num_tasks: int) -> tuple[np.ndarray, np.ndarray]:
        """This iteration's perturbations ``[pairs, P]`` and task indices: a function of (seed, iteration)."""
        rng = np.random.default_rng([self.seed, self.iteration])
        return rng.standard_normal((self.pairs, self.theta.size)), rng.integers(num_tasks, size=self.pairs)

    def candidates(self, noise: np.ndarray) -> list[np.ndarray]:
        return [self.theta + sign * self.sigma * e for e in noise for sign in (1, -1)]

    def tell(self, noise: np.ndarray, values: list[float]) -> float:
        plus, minus = np.array(values[0::2]), np.array(values[1::2])
        diff = (plus - minus) / np.maximum((plus + minus) / 2, 1e-12)
        gradient = diff @ noise / (2 * self.sigma * self.pairs)
        self.iteration += 1
        t = self.iteration
        self.m = 0.9 * self.m + 0.1 * gradient
        self.v = 0.999 * self.v + 0.001 * gradient ** 2
        self.theta -= self.lr * (self.m / (1 - 0.9 ** t)) / (np.sqrt(self.v / (1 - 0.999 ** t)) + 1e-8)
        return float(np.linalg.norm(gradient))

    def state_dict(self) -> dict:
        return {"theta": self.theta, "m": self.m, "v": self.v, "iteration": self.iteration,
                "sigma": self.sigma, "lr": self.lr, "pairs": self.pairs, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.theta, self.m, self.v = state["theta"].copy(), state["m"].copy(), state["v"].copy()
        self.iteration = int(state["iteration"])


def evolve(objective, theta0: np.ndarray, tasks: list, iterations: int, pairs: int = 4,
           sigma: float = 0.05, lr: float = 0.02, seed: int = 0, workers: int = 1,
           out: str | Path | None = None, resume: bool = False, save_weights=None,
           threads: int = 1, max_value: float = 1e6, eval_every: int = 0, log=print,
           evaluate=None) -> ES:
    """Run ES for ``iterations`` on ``objective(theta, *task) -> float``; returns the optimiser.

    Values that are not finite or above ``max_value`` (diverged runs) count as ``max_value``.
    Every ``eval_every`` iterations (0: never) the unperturbed ``theta`` is also scored on every
    task: ``center_objective`` in the log, comparable across iterations (the ES ``objective``
    is the mean over this iteration's perturbed runs, on randomly drawn tasks).

    With ``out``: checkpoint, log and weights (``save_weights(theta, path)``) every iteration.
    ``objective`` must be picklable (a module-level function) when ``workers > 1``.
    ``evaluate(jobs, iteration) -> values``, if given, scores the ``(theta, task)`` jobs instead.
    """
    es = ES(theta0, sigma, lr, pairs, seed)
    out = Path(out) if out is not None else None
    rows: list[dict] = []
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if resume and (out / STATE).exists():
            state = torch.load(out / STATE, weights_only=False)
            if (state["sigma"], state["lr"], state["pairs"], state["seed"]) != (sigma, lr, pairs, seed):
                raise UserError(f"--resume with different ES settings than {out / STATE}; "
                                "use the same --sigma --lr --pairs --seed, or a new --out")
            es.load_state_dict(state)
            rows = [json.loads(line) for line in (out / LOG).read_text().splitlines() if line.strip()]
            rows = [r for r in rows if r["iteration"] < es.iteration]
        elif (out / STATE).exists():
            raise UserError(f"{out} already holds a meta-training run; pass --resume to continue it, "
                            "or choose another --out")
    pool = (ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                                initargs=(threads,)) if workers > 1 else None)
    try:
        while es.iteration < iterations:
            start = time.perf_counter()
            noise, task_index = es.ask(len(tasks))
            jobs = [(theta, tasks[task_index[i // 2]]) for i, theta in enumerate(es.candidates(noise))]
            center = bool(eval_every) and es.iteration % eval_every == 0
            if center:
                jobs += [(es.theta.copy(), task) for task in tasks]
            if evaluate is not None:
                values = evaluate(jobs, es.iteration)
            elif pool is None:
                values = [objective(theta, *task) for theta, task in jobs]
            else:
                values = list(pool.map(objective, [j[0] for j in jobs], *zip(*[j[1] for j in jobs])))
            values = [v if math.isfinite(v) and v < max_value else max_value for v in map(float, values)]
            values, center_values = values[:2 * pairs], values[2 * pairs:]
            iteration = es.iteration
            grad_norm = es.tell(noise, values)
            row = {"iteration": iteration, "objective": float(np.mean(values)),
                   "objective_plus": float(np.mean(values[0::2])), "objective_minus": float(np.mean(values[1::2])),
                   "tasks": [int(t) for t in task_index], "grad_norm": grad_norm,
                   "wall_s": round(time.perf_counter() - start, 3)}
            if center:
                row["center_objective"] = float(np.mean(center_values))
            rows.append(row)
            if out is not None:
                if save_weights is not None:
                    save_weights(es.theta, out / WEIGHTS)
                write_atomic(out / LOG, "".join(json.dumps(r) + "\n" for r in rows))
                save_atomic(es.state_dict(), out / STATE)
            centered = f", unperturbed {row['center_objective']:.4f}" if center else ""
            log(f"iteration {iteration}: objective {row['objective']:.4f}{centered} ({row['wall_s']:.1f} s)")
    finally:
        if pool is not None:
            pool.shutdown()
    return es


# ---------------------------------------------------------------------- command line
def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m meta_llr.metatrain", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder (weights.pt, metatrain.jsonl, state)")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=4, help="antithetic pairs per iteration")
    parser.add_argument("--sigma", type=float, default=0.05, help="ES perturbation scale")
    parser.add_argument("--lr", type=float, default=0.02, help="Adam LR on the learner weights")
    parser.add_argument("--seed", type=int, default=0, help="seeds perturbations and task draws")
    parser.add_argument("--task", action="append", default=None,
                        help='Hydra overrides of one task, e.g. "model=shallow data=digits" (repeatable)')
    parser.add_argument("--seeds", default="0,1", help="run seeds, crossed with the tasks")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each short run")
    parser.add_argument("--set", nargs="*", default=[], help="Hydra overrides for every run, e.g. trainer.lr=0.1")
    parser.add_argument("--val-size", type=int, default=300, help="validation images held out per run")
    parser.add_argument("--max-loss", type=float, default=10.0, help="score of a diverged run")
    parser.add_argument("--init", default=None, help="start from this weights.pt instead of the seeded learner")
    parser.add_argument("--eval-every", type=int, default=5,
                        help="iterations between scoring the unperturbed learner on every task (0: never)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--launcher", default=None,
                        help="score runs through this Hydra launcher (basic, joblib, submitit_slurm, ...) "
                             "instead of --workers processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    args = parser.parse_args(argv)
    if args.eval_every < 0:
        raise UserError("--eval-every must be >= 0")
    if args.iterations < 1 or args.epochs < 1 or args.pairs < 1 or args.workers < 1 or args.sigma <= 0 or args.lr <= 0:
        raise UserError("--iterations, --pairs, --workers must be >= 1 and --sigma, --lr > 0")
    if args.val_size < 1:
        raise UserError("--val-size must be >= 1: the objective is the validation loss")
    return args


def main(argv: list[str] | None = None) -> None:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
        learner_overrides = [o for o in args.set if o.startswith("controller.")]
        base = ["controller=rnn_meta", "controller.learn=off", "quiet=true", "trainer.checkpoint=false",
                f"data.val_size={args.val_size}", f"trainer.epochs={args.epochs}", *args.set]
        tasks = [([*base, *task.split(), f"seed={seed}"], args.max_loss)
                 for task in (args.task or ["model=shallow data=digits"]) for seed in seeds]
        for overrides, _ in tasks:
            _compose(overrides)     # a bad override fails here, in one line, before any run
        from meta_llr.registry import build_controller
        controller = build_controller(_compose(["controller=rnn_meta", "controller.learn=off",
                                                *learner_overrides]).controller)
        if args.init is not None:
            controller.load_weights(args.init)
        theta0 = controller.flat().double().numpy()
        print(f"meta-training rnn_meta ({theta0.size} weights) on {len(tasks)} tasks, "
              f"{2 * args.pairs} runs per iteration, {args.workers} worker(s)")

        def save_weights(theta, path):
            controller.load_flat(torch.as_tensor(theta, dtype=torch.float32))
            controller.save_weights(path)

        def launched(jobs, iteration):
            return launch_jobs(jobs, Path(args.out) / "launched" / f"iteration{iteration}", args.launcher,
                               save_weights)

        evaluate = launched if args.launcher else None

        evolve(run_objective, theta0, tasks, args.iterations, args.pairs, args.sigma, args.lr, args.seed,
               args.workers, args.out, args.resume, save_weights, args.threads, args.max_loss,
               args.eval_every, evaluate=evaluate)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"weights: {Path(args.out) / WEIGHTS}")


if __name__ == "__main__":
    main()
