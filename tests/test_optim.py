"""FlatStep equals torch.optim's step with per-layer LRs, within float rounding."""
import copy
from types import SimpleNamespace

import pytest
import torch

from meta_llr.optim import FlatStep, layer_optimizer


def layers_of(model):
    return [SimpleNamespace(index=i, params=list(m.parameters())) for i, m in enumerate(model)]


def reference(twin, trainer, scale_1d):
    """torch.optim on the twin: one group per parameter, its LR set by hand each step; a
    BatchNorm's tensors get ``norm_lr_mult`` times the LR and their decay divided by it."""
    groups = []
    for i, module in enumerate(twin):
        mult = trainer.norm_lr_mult if isinstance(module, torch.nn.BatchNorm2d) else 1.0
        for p in module.parameters():
            decay = trainer.weight_decay if p.dim() > 1 or trainer.decay_1d else 0.0
            groups.append({"params": [p], "weight_decay": decay / mult, "layer": i, "scaled": p.dim() > 1 or scale_1d,
                           "mult": mult})
    if trainer.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=trainer.momentum, nesterov=trainer.nesterov,
                               weight_decay=trainer.weight_decay, foreach=False)
    return torch.optim.AdamW(groups, lr=0.0, betas=trainer.betas, weight_decay=trainer.weight_decay, foreach=False)


def conv_model():  # no bias before BatchNorm: its gradient would be rounding noise, which Adam amplifies
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 3),
                               torch.nn.Flatten(), torch.nn.Linear(2 * 4 * 4, 3))


CASES = [("sgd", 0.9, True, True, True, 1.0), ("sgd", 0.9, True, False, True, 1.0),
         ("sgd", 0.9, False, True, False, 1.0), ("sgd", 0.0, False, True, True, 1.0),
         ("adamw", 0.9, False, False, True, 1.0), ("adamw", 0.9, False, True, False, 1.0),
         ("sgd", 0.85, True, True, True, 64.0), ("sgd", 0.9, True, False, False, 8.0),
         ("adamw", 0.9, False, True, True, 8.0)]


@pytest.mark.parametrize("optimizer,momentum,nesterov,decay_1d,scale_1d,norm_lr_mult", CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_flat_step_equals_torch_optim_with_layer_lrs_and_frozen_steps(optimizer, momentum, nesterov, decay_1d,
                                                                      scale_1d, norm_lr_mult, channels_last):
    torch.manual_seed(0)
    model = conv_model()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    twin = copy.deepcopy(model)
    trainer = SimpleNamespace(optimizer=optimizer, lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=1e-2,
                              decay_1d=decay_1d, betas=(0.9, 0.99), norm_lr_mult=norm_lr_mult)
    ours = layer_optimizer(layers_of(model), trainer, scale_1d=scale_1d,
                           norm_params={id(p) for p in model[1].parameters()})
    step = FlatStep(ours, num_layers=len(model))  # moves the parameters into its flat buffer
    if channels_last:  # the parameters kept their strides as views of the flat buffer
        assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert all(p.untyped_storage().data_ptr() == step.flat.untyped_storage().data_ptr() for p in model.parameters())
    theirs = reference(twin, trainer, scale_1d)
    for t in range(8):
        scales, global_lr = torch.rand(len(model)) + 0.5, 0.05 * (t + 1)
        x = torch.randn(6, 3, 8, 8)
        for m in (model, twin):
            for p in m[2].parameters():   # the middle conv is frozen at steps 2 and 3 (and 6)
                p.requires_grad_(t not in (2, 3, 6))
            m(x).square().mean().backward()
        for group in theirs.param_groups:
            group["lr"] = global_lr * (float(scales[group["layer"]]) if group["scaled"] else 1.0) * group["mult"]
        step.step(scales, global_lr)
        theirs.step()
        for m in (model, twin):
            for p in m.parameters():
                p.grad = None
        step.sync_state()
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=lambda m: f"step {t}: {m}")
            for key, value in theirs.state[q].items():
                torch.testing.assert_close(ours.state[p][key].float(), value.float(), rtol=1e-5, atol=1e-7)
            # each step is compared from the same state: rounding differences do not compound
            # (Adam divides by the root of tiny second moments, which amplifies them)
            with torch.no_grad():
                q.copy_(p)
                for key, value in theirs.state[q].items():
                    value.copy_(ours.state[p][key])


def test_frozen_parameters_and_their_state_stay_bitwise_unchanged():
    torch.manual_seed(0)
    model = conv_model()
    trainer = SimpleNamespace(optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2,
                              decay_1d=True, betas=(0.9, 0.99))
    optimizer = layer_optimizer(layers_of(model), trainer, scale_1d=True)
    step = FlatStep(optimizer, num_layers=len(model))
    model(torch.randn(4, 3, 8, 8)).sum().backward()
    step.step(torch.ones(len(model)), 0.1)
    for p in model.parameters():
        p.grad = None
    frozen = list(model[0].parameters())
    before = [p.clone() for p in frozen] + [optimizer.state[p]["momentum_buffer"].clone() for p in frozen]
    for p in frozen:
        p.requires_grad_(False)
    model(torch.randn(4, 3, 8, 8)).sum().backward()
    step.step(torch.ones(len(model)), 0.1)
    after = list(frozen) + [optimizer.state[p]["momentum_buffer"] for p in frozen]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_state_round_trip_through_torch_state_dict():
    torch.manual_seed(0)
    trainer = SimpleNamespace(optimizer="adamw", lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2,
                              decay_1d=True, betas=(0.9, 0.99))
    models = [conv_model() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [layer_optimizer(layers_of(m), trainer, scale_1d=True) for m in models]
    steps = [FlatStep(o, num_layers=len(models[0])) for o in optimizers]
    x = torch.randn(4, 3, 8, 8)
    for _ in range(3):
        models[0](x).square().mean().backward()
        steps[0].step(torch.ones(5), 0.01)
        for p in models[0].parameters():
            p.grad = None
    steps[0].sync_state()
    models[1].load_state_dict(models[0].state_dict())
    optimizers[1].load_state_dict(copy.deepcopy(optimizers[0].state_dict()))
    steps[1].load_state()
    assert steps[1].steps == [3] * len(steps[1].params)
    for model, step in zip(models, steps):
        model(x).square().mean().backward()
        step.step(torch.ones(5), 0.01)
    assert all(torch.equal(p, q) for p, q in zip(models[0].parameters(), models[1].parameters()))


def test_flat_step_refuses_what_it_does_not_implement():
    p = torch.nn.Parameter(torch.zeros(3))
    group = {"params": [p], "layer": 0, "kind": 0, "scaled": True}
    with pytest.raises(ValueError, match="dampening"):
        FlatStep(torch.optim.SGD([group], lr=0.1, momentum=0.9, dampening=0.5), num_layers=1)
