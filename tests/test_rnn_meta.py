"""rnn_meta: learns the right layer ordering on a quadratic, exact hypergradients, weights, determinism."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from baselines.uniform import Uniform
from controllers.rnn_meta import RNNMeta
from meta_llr.errors import UserError
from meta_llr.interface import Layer, Lookahead, Plan
from meta_llr.lookahead import unrolled_hypergradient
from meta_llr.run import build_run
from tests.conftest import TINY, compose_config

CURVATURES = (1.0, 10.0, 100.0)
LR = 0.018  # η·λ = 0.018, 0.18, 1.8: far too small for the flat layer, near the limit 2 for the sharp one


pytestmark = pytest.mark.usefixtures("one_thread")


class Quadratic:
    """``L = Σ_l ½ λ_l ‖θ_l‖²`` by plain SGD at ``lr·s_l``; ``observe`` gets the loop's statistics."""

    def __init__(self, curvatures=CURVATURES, dim=8, lr=LR, steps=100, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.curvatures = torch.tensor(curvatures)
        self.theta = [torch.randn(1, dim, generator=gen) for _ in curvatures]
        last = len(curvatures) - 1
        self.layers = [Layer(index=i, name=f"q{i}", depth=i / last, params=[t], weight=t)
                       for i, t in enumerate(self.theta)]
        self.plan = Plan(total_steps=steps, steps_per_epoch=steps, epochs=1, device=torch.device("cpu"),
                         lr_table=torch.full((steps,), lr))
        self.prev_update = [torch.zeros_like(t) for t in self.theta]

    def loss(self) -> torch.Tensor:
        return sum(0.5 * c * (t * t).sum() for c, t in zip(self.curvatures, self.theta))

    def step(self, controller, step: int) -> None:
        scales, lr = controller.scales(step), self.plan.lr_table[step]
        grads = [c * t for c, t in zip(self.curvatures, self.theta)]
        stats = {"loss": self.loss(), "global_lr": lr, "scales": scales,
                 "grad_norm": torch.stack([g.norm() for g in grads]),
                 "grad_dot_prev_update": torch.stack([(g * u).sum() for g, u in zip(grads, self.prev_update)])}
        for i, (theta, g) in enumerate(zip(self.theta, grads)):
            self.prev_update[i] = -lr * scales[i] * g
            theta.add_(self.prev_update[i])
        stats["update_norm"] = torch.stack([u.norm() for u in self.prev_update])
        stats["weight_norm"] = torch.stack([t.norm() for t in self.theta])
        controller.observe(step, stats)

    def run(self, controller) -> float:
        controller.setup(self.layers, self.plan)
        for step in range(self.plan.total_steps):
            self.step(controller, step)
        return float(self.loss())


def test_online_learner_raises_flat_layers_above_the_sharp_one_and_beats_uniform():
    uniform_loss = Quadratic().run(Uniform())
    controller = RNNMeta(learn="online")
    loss = Quadratic().run(controller)
    flat, middle, sharp = controller.current.tolist()
    assert flat > sharp and middle > sharp, controller.current
    assert flat > 2.0                        # the flat layer's LR was far too small
    assert LR * CURVATURES[2] * sharp < 2.0   # the sharp layer stays stable
    assert loss < 0.01 * uniform_loss, (loss, uniform_loss)


def test_initial_scales_are_the_baseline_and_bounded():
    controller = RNNMeta(learn="off", min_scale=0.5, max_scale=4.0, baseline=[1.0, 2.0, 0.5])
    quad = Quadratic(steps=30)
    controller.setup(quad.layers, quad.plan)
    assert torch.allclose(controller.scales(0), torch.tensor([1.0, 2.0, 0.5]), rtol=0.05)
    controller.learner.head.weight.data.fill_(100.0)   # saturate the tanh: scales hit the bounds
    quad.run(controller)
    ratio = controller.current / torch.tensor([1.0, 2.0, 0.5])
    at_a_bound = ((ratio - 0.5).abs() < 1e-3) | ((ratio - 4.0).abs() < 1e-3)
    assert at_a_bound.all(), ratio


def test_hypergradient_statistic_matches_finite_differences_of_the_next_step_loss(tmp_path):
    """∂L(t+1)/∂log s_l(t) = g_l(t+1)·u_l(t): the loop's ``grad_dot_prev_update`` (plain SGD)."""
    cfg = compose_config(*TINY, "controller=rnn_meta", "trainer.momentum=0", "trainer.weight_decay=0")
    run = build_run(cfg, tmp_path)
    seen = {}
    observe = run.controller.observe
    run.controller.observe = lambda step, stats: (seen.__setitem__(step, dict(stats)), observe(step, stats))
    batches = run.batches()
    (x0, y0), (x1, y1) = next(batches), next(batches)
    before = [p.detach().clone() for p in run.params]
    run.train_step(x0, y0)
    update = [p.detach() - b for p, b in zip(run.params, before)]
    run.train_step(x1, y1)
    hypergradient = seen[1]["grad_dot_prev_update"].double()

    model = copy.deepcopy(run.model).double()
    params = [p for layer in run.layers for p in layer.params]
    position = {id(p): i for i, p in enumerate(params)}
    x, eps = run.normalize(x1).double(), 1e-3

    def next_loss(layer_index: int, delta: float) -> float:
        with torch.no_grad():
            for (name, p_double), p in zip(model.named_parameters(), run.model.parameters()):
                i = position[id(p)]
                factor = torch.exp(torch.tensor(delta, dtype=torch.float64)) if i in layer_params else 1.0
                p_double.copy_(before[i].double() + factor * update[i].double())
            return F.cross_entropy(model(x), y1).item()

    for layer in run.layers:
        layer_params = {position[id(p)] for p in layer.params}
        finite_difference = (next_loss(layer.index, eps) - next_loss(layer.index, -eps)) / (2 * eps)
        assert hypergradient[layer.index].item() == pytest.approx(finite_difference, rel=1e-3)


def test_unrolled_hypergradient_matches_finite_differences():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    layer_of = {id(p): (0 if i < 2 else 1) for i, p in enumerate(model.parameters())}
    batches = [(torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))) for _ in range(4)]
    train, held_out = batches[:3], batches[3]
    log_s = torch.tensor([0.3, -0.2], dtype=torch.float64)
    value, grad = unrolled_hypergradient(model, F.cross_entropy, log_s, layer_of, train, held_out, lr=0.5)

    def lookahead_loss(log_scales):
        params = [p.detach().clone().requires_grad_() for p in model.parameters()]
        for x, y in train:
            clone = copy.deepcopy(model)
            with torch.no_grad():
                for q, p in zip(clone.parameters(), params):
                    q.copy_(p)
            loss = F.cross_entropy(clone(x), y)
            grads = torch.autograd.grad(loss, list(clone.parameters()))
            params = [p - 0.5 * log_scales[0 if i < 2 else 1].exp() * g
                      for i, (p, g) in enumerate(zip(params, grads))]
        clone = copy.deepcopy(model)
        with torch.no_grad():
            for q, p in zip(clone.parameters(), params):
                q.copy_(p)
        return F.cross_entropy(clone(held_out[0]), held_out[1]).item()

    assert value.item() == pytest.approx(lookahead_loss(log_s), rel=1e-12)
    eps = 1e-5
    for layer in range(2):
        step = torch.zeros(2, dtype=torch.float64)
        step[layer] = eps
        finite_difference = (lookahead_loss(log_s + step) - lookahead_loss(log_s - step)) / (2 * eps)
        assert grad[layer].item() == pytest.approx(finite_difference, rel=1e-6)
    assert grad.abs().min() > 1e-6  # both layers matter: the test would notice a zero gradient


def test_weights_save_load_round_trip(tmp_path):
    trained = RNNMeta(learn="online")
    Quadratic(steps=40).run(trained)
    path = tmp_path / "weights.pt"
    trained.save_weights(path)
    frozen = RNNMeta(learn="off", weights=str(path))
    assert torch.equal(frozen.flat(), trained.flat())
    assert not torch.equal(frozen.flat(), RNNMeta().flat())  # online learning changed the weights
    fresh = RNNMeta(learn="off")
    fresh.load_flat(trained.flat())
    assert torch.equal(fresh.flat(), trained.flat())


def test_bad_weights_give_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        RNNMeta(learn="off", weights=str(tmp_path / "missing.pt"))
    RNNMeta(hidden=8).save_weights(tmp_path / "w8.pt")
    with pytest.raises(UserError, match="controller.hidden=8"):
        RNNMeta(learn="off", weights=str(tmp_path / "w8.pt"))
    with pytest.raises(ValueError):
        RNNMeta(min_scale=2.0)


def _bad_weights(kind):
    good = RNNMeta().weights_dict()
    nan = {k: torch.full_like(v, float("nan")) for k, v in good["params"].items()}
    return {"wrong_format": {**good, "format": "other/1"}, "a_tensor": torch.zeros(3),
            "wrong_keys": {**good, "params": {"gru.weight": torch.zeros(3)}},
            "wrong_shapes": {**good, "params": RNNMeta(hidden=8).weights_dict()["params"]},
            "no_hidden": {k: v for k, v in good.items() if k != "hidden"},
            "non_finite": {**good, "params": nan}}[kind]


@pytest.mark.parametrize("kind", ["text", "random_bytes", "wrong_format", "a_tensor", "wrong_keys", "wrong_shapes",
                                  "no_hidden", "non_finite"])
def test_garbage_weights_files_are_one_line(tmp_path, kind):
    path = tmp_path / f"{kind}.pt"
    if kind == "text":
        path.write_text("these are not weights\n")
    elif kind == "random_bytes":
        path.write_bytes(bytes(range(256)) * 4)
    else:
        torch.save(_bad_weights(kind), path)
    with pytest.raises(UserError) as e:
        compose_config(*TINY, "controller=rnn_meta", "controller.learn=off", f"controller.weights={path}")
    msg = str(e.value)
    assert "\n" not in msg and f"controller.weights={path}" in msg and "format meta_llr.rnn_meta/1" in msg


@pytest.mark.parametrize("content", ["", "step,progress,global_lr,q0,q1,q2\n0,0.0,0.1,1,one,1\n",
                                     "step,progress,global_lr,q0,q1,q2\n0,0.0,0.1,1,nan,1\n",
                                     "step,progress,global_lr,q0,q1,q2\n0,0.0,0.1,1\n"])
def test_bad_baseline_csv_is_one_line(tmp_path, content):
    path = tmp_path / "llr.csv"
    path.write_text(content)
    quad = Quadratic(steps=4)
    with pytest.raises(UserError) as e:
        RNNMeta(baseline_curve=str(path)).setup(quad.layers, quad.plan)
    assert "\n" not in str(e.value) and f"controller.baseline_curve={path}" in str(e.value)


def test_learn_off_is_deterministic_and_uses_the_weights(tmp_path):
    trained = RNNMeta(learn="online", meta_lr=0.05)
    Quadratic(steps=60).run(trained)
    trained.save_weights(tmp_path / "weights.pt")
    results = []
    for name in ("a", "b"):
        cfg = compose_config(*TINY, "controller=rnn_meta", "controller.learn=off",
                             f"controller.weights={tmp_path / 'weights.pt'}")
        run = build_run(cfg, tmp_path / name)
        for _ in range(run.epochs):
            for x, y in run.batches():
                run.train_step(x, y)
        results.append((run.trace.clone(), [p.detach().clone() for p in run.params], run.controller.flat()))
    (trace_a, params_a, flat_a), (trace_b, params_b, flat_b) = results
    assert torch.equal(trace_a, trace_b)
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))
    assert torch.equal(flat_a, trained.flat()) and torch.equal(flat_b, trained.flat())  # frozen
    assert (trace_a[1:] - 1).abs().max() > 1e-3   # the learned weights move the scales


def test_unrolled_mode_through_the_api(tmp_path):
    cfg = compose_config(*TINY, "controller=rnn_meta", "controller.learn=unrolled", "controller.meta_every=2",
                         "controller.unroll=2", "controller.horizon=1")
    run = build_run(cfg, tmp_path / "unrolled")
    x_all, y_all = run.train_x, run.train_y

    def sample(k):
        batches = [(run.normalize(x_all[i * 8:(i + 1) * 8]), y_all[i * 8:(i + 1) * 8]) for i in range(3)]
        return batches[:2], batches[2]

    run.controller.attach_lookahead(Lookahead(run.model, F.cross_entropy, sample))
    start = run.controller.flat()
    for x, y in run.batches():
        run.train_step(x, y)
    assert not torch.equal(run.controller.flat(), start)
    assert torch.isfinite(run.controller.current).all()

    plain = build_run(cfg, tmp_path / "plain")   # no validation split to draw from: one line naming the fix,
    with pytest.raises(UserError, match="data.val_size"):    # at the first step, not the first lookahead
        plain.train_step(*next(iter(plain.batches())))
    with pytest.raises(UserError, match="trainer.optimizer=sgd"):  # the lookahead's SGD: refused at build
        build_run(compose_config(*TINY, "controller=rnn_meta", "controller.learn=unrolled", "trainer.optimizer=adamw"),
                  tmp_path / "adamw")


def test_unrolled_mode_in_the_loop_with_batchnorm(tmp_path):
    """From the config alone: the loop hands its model, loss and batches to the learner."""
    tiny = [o for o in TINY if not o.startswith("model")]
    cfg = compose_config(*tiny, "model=shallow", "model.width=4", "data.val_size=16", "controller=rnn_meta",
                         "controller.learn=unrolled", "controller.meta_every=2", "controller.unroll=2",
                         "controller.horizon=1")
    run = build_run(cfg, tmp_path)
    start = run.controller.flat()
    running_mean = [b.clone() for n, b in run.model.named_buffers() if n.endswith("running_mean")]
    x, y = next(iter(run.batches()))
    run.controller._unrolled_signal(0)   # the lookahead leaves the model's BatchNorm statistics alone
    assert all(torch.equal(a, b) for a, b in zip(
        running_mean, [b for n, b in run.model.named_buffers() if n.endswith("running_mean")]))
    summary = run.fit()
    assert summary["status"] == "finished"
    assert not torch.equal(run.controller.flat(), start)
    assert torch.isfinite(run.controller.current).all()


def test_every_two_steps_still_learns_the_ordering():
    controller = RNNMeta(learn="online", every=2, horizon=1)
    loss = Quadratic().run(controller)
    flat, middle, sharp = controller.current.tolist()
    assert flat > sharp and middle > sharp
    assert loss < 0.01 * Quadratic().run(Uniform())


def test_replayed_baseline_curve_from_an_llr_csv(tmp_path):
    """A neutral learner (zero output weights, symmetric bounds: offset 0) replays llr.csv exactly."""
    path = tmp_path / "llr.csv"
    path.write_text("step,progress,global_lr,q0,q1,q2\n0,0.0,0.018,2.0,1.0,0.5\n5,0.5,0.018,1.0,1.0,0.25\n")
    controller = RNNMeta(learn="off", baseline_curve=str(path))
    controller.learner.head.weight.data.zero_()
    quad = Quadratic(steps=10)
    controller.setup(quad.layers, quad.plan)
    seen = []
    for step in range(10):
        seen.append(controller.scales(step).clone())
        quad.step(controller, step)
    assert torch.allclose(seen[0], torch.tensor([2.0, 1.0, 0.5]))
    assert torch.allclose(seen[4], torch.tensor([2.0, 1.0, 0.5]))
    assert torch.allclose(seen[5], torch.tensor([1.0, 1.0, 0.25]))
    assert torch.allclose(seen[9], torch.tensor([1.0, 1.0, 0.25]))
    with pytest.raises(UserError, match="layer columns"):
        bad = tmp_path / "bad.csv"
        bad.write_text("step,progress,global_lr,q0\n0,0.0,0.1,1.0\n")
        RNNMeta(baseline_curve=str(bad)).setup(quad.layers, quad.plan)

    exported = tmp_path / "curve.json"   # a meta_llr.curves file: piecewise linear in progress
    exported.write_text(json.dumps({"format": "meta_llr.curve/1", "layers": [
        {"name": f"q{i}", "knots": [0.0, 0.5], "values": [1.0, v]} for i, v in enumerate((3.0, 1.0, 0.5))]}))
    controller = RNNMeta(learn="off", baseline_curve=str(exported))
    controller.learner.head.weight.data.zero_()
    controller.setup(quad.layers, quad.plan)
    assert torch.allclose(controller.log_base[2].exp(), torch.tensor([1.8, 1.0, 0.8]))   # p = 0.2
    assert torch.allclose(controller.log_base[7].exp(), torch.tensor([3.0, 1.0, 0.5]))   # after the last knot


@pytest.mark.parametrize("nesterov", [False, True])
def test_unrolled_lookahead_follows_the_runs_own_sgd(nesterov):
    """k steps of torch.optim.SGD (momentum from a non-zero buffer, Nesterov, L2 decay on the
    kernels only, per-layer LRs) land where the unrolled lookahead says, and its gradient
    matches finite differences of that real optimizer's held-out loss."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    params = list(model.parameters())
    layer_of = {id(p): (0 if i < 2 else 1) for i, p in enumerate(params)}
    decay = {id(p): (0.01 if p.dim() > 1 else 0.0) for p in params}
    batches = [(torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))) for _ in range(4)]
    train, held_out = batches[:2], batches[3]
    lr, mu = 0.3, 0.9
    buffers = {id(p): torch.randn_like(p) * 0.1 for p in params}

    def real_loss(log_s):
        clone = copy.deepcopy(model)
        groups = [{"params": [q], "lr": lr * float(log_s[layer_of[id(p)]].exp()), "weight_decay": decay[id(p)]}
                  for p, q in zip(params, clone.parameters())]
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=mu, nesterov=nesterov)
        for p, q in zip(params, clone.parameters()):
            optimizer.state[q]["momentum_buffer"] = buffers[id(p)].clone()
        for x, y in train:
            optimizer.zero_grad()
            F.cross_entropy(clone(x), y).backward()
            optimizer.step()
        with torch.no_grad():
            return F.cross_entropy(clone(held_out[0]), held_out[1]).item()

    log_s = torch.tensor([0.2, -0.3], dtype=torch.float64)
    value, grad = unrolled_hypergradient(model, F.cross_entropy, log_s, layer_of, train, held_out, lr=lr,
                                         momentum=mu, nesterov=nesterov, decay_of=decay, momentum_buffers=buffers)
    assert value.item() == pytest.approx(real_loss(log_s), rel=1e-10)
    eps = 1e-5
    for layer in range(2):
        step = torch.zeros(2, dtype=torch.float64)
        step[layer] = eps
        finite = (real_loss(log_s + step) - real_loss(log_s - step)) / (2 * eps)
        assert grad[layer].item() == pytest.approx(finite, rel=1e-5, abs=1e-9)
