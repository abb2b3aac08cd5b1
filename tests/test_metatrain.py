"""Meta-training rnn_meta across runs: ES improves the objective, resumes exactly, CLI end to end."""
import json

import numpy as np
import pytest
import torch

from controllers.rnn_meta import RNNMeta
from meta_llr.metatrain import ES, evolve, main
from tests.conftest import TINY, compose_config
from tests.test_rnn_meta import Quadratic


pytestmark = pytest.mark.usefixtures("one_thread")


def quadratic_objective(theta, seed):
    """Loss after 20 SGD steps on the [1, 10, 100] quadratic with the frozen learner ``theta``."""
    controller = RNNMeta(learn="off")
    controller.load_flat(torch.as_tensor(theta, dtype=torch.float32))
    return Quadratic(steps=20, seed=seed).run(controller)


def start():
    return RNNMeta(learn="off").flat().double().numpy()


def test_es_improves_the_meta_objective_on_held_out_quadratics():
    theta0 = start()
    es = evolve(quadratic_objective, theta0, [(0,), (1,), (2,)], iterations=20, pairs=2, sigma=0.05, lr=0.03,
                log=lambda *_: None)
    before = np.mean([quadratic_objective(theta0, seed) for seed in (10, 11)])
    after = np.mean([quadratic_objective(es.theta, seed) for seed in (10, 11)])
    assert es.iteration == 20
    assert after < 0.2 * before, (before, after)


def test_es_gradient_estimate_points_downhill_on_a_known_function():
    """On f(θ) = ½‖θ − 1‖² + 1 the antithetic estimate with many pairs approaches (θ − 1)/f(θ)."""
    es = ES(np.zeros(3), sigma=0.01, lr=0.1, pairs=4000, seed=0)
    noise, _ = es.ask(1)
    values = [0.5 * np.sum((theta - 1) ** 2) + 1 for theta in es.candidates(noise)]
    plus, minus = np.array(values[0::2]), np.array(values[1::2])
    estimate = ((plus - minus) / ((plus + minus) / 2)) @ noise / (2 * 0.01 * 4000)
    np.testing.assert_allclose(estimate, -np.ones(3) / 2.5, atol=0.03)
    es.tell(noise, values)
    assert np.all(es.theta > 0)   # Adam's first step moves every coordinate towards 1


def test_checkpoint_and_resume_continue_exactly(tmp_path):
    tasks = [(0,), (1,)]
    straight = evolve(quadratic_objective, start(), tasks, 3, pairs=1, out=tmp_path / "a", log=lambda *_: None)
    evolve(quadratic_objective, start(), tasks, 2, pairs=1, out=tmp_path / "b", log=lambda *_: None)
    resumed = evolve(quadratic_objective, start(), tasks, 3, pairs=1, out=tmp_path / "b", resume=True,
                     log=lambda *_: None)
    np.testing.assert_array_equal(straight.theta, resumed.theta)
    rows_a = [json.loads(line) for line in (tmp_path / "a" / "metatrain.jsonl").read_text().splitlines()]
    rows_b = [json.loads(line) for line in (tmp_path / "b" / "metatrain.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows_b] == [0, 1, 2]
    assert [r["objective"] for r in rows_a] == [r["objective"] for r in rows_b]


def test_cli_writes_weights_that_plug_into_a_frozen_run(tmp_path, capsys):
    out = tmp_path / "meta"
    task = " ".join(o for o in TINY if o.startswith(("data", "model")))
    argv = ["--out", str(out), "--iterations", "1", "--pairs", "1", "--task", task, "--seeds", "0",
            "--epochs", "1", "--val-size", "16", "--eval-every", "1", "--set", "device=cpu", "data.train_size=96"]
    main(argv)
    rows = [json.loads(line) for line in (out / "metatrain.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and np.isfinite(rows[0]["objective"]) and np.isfinite(rows[0]["center_objective"])
    assert rows[0]["objective"] == pytest.approx((rows[0]["objective_plus"] + rows[0]["objective_minus"]) / 2)

    from meta_llr.run import train
    cfg = compose_config(*TINY, "controller=rnn_meta", "controller.learn=off", f"controller.weights={out / 'weights.pt'}")
    summary = train(cfg, tmp_path / "frozen")
    assert summary["status"] == "finished"

    with pytest.raises(SystemExit) as error:     # the same --out again without --resume: one line
        main(argv)
    assert error.value.code == 2
    assert "--resume" in capsys.readouterr().err


def test_hydra_launcher_scores_equal_the_in_process_objective(tmp_path):
    """``--launcher basic``: the same short runs launched as a Hydra multirun score the same."""
    from meta_llr.metatrain import launch_jobs, run_objective

    overrides = ["controller=rnn_meta", "controller.learn=off", "quiet=true", "trainer.checkpoint=false",
                 "data.val_size=16", *TINY, "data.train_size=96", "trainer.epochs=1", "seed=0"]
    learner = RNNMeta(learn="off")
    base = learner.flat().double().numpy()
    thetas = [base, base + 0.5 * np.random.default_rng(0).standard_normal(base.size)]

    def save_weights(theta, path):
        learner.load_flat(torch.as_tensor(theta, dtype=torch.float32))
        learner.save_weights(path)

    launched = launch_jobs([(theta, (overrides, 10.0)) for theta in thetas], tmp_path / "launched", "basic",
                           save_weights)
    torch.set_num_threads(2)  # as in the launched processes: same reduction order
    direct = [run_objective(theta.astype(np.float32), overrides, 10.0) for theta in thetas]
    assert launched == pytest.approx(direct, rel=1e-5)
    assert abs(launched[0] - launched[1]) > 1e-3   # so a swapped mapping would fail
    assert not (tmp_path / "launched").exists()   # scored runs are removed
