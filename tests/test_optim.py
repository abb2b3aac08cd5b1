"""The loop's optimizer step equals torch.optim's step, bit for bit, with per-layer tensor LRs."""
import copy
from types import SimpleNamespace

import pytest
import torch

from meta_llr.optim import FusedStep, layer_optimizer


def layers_of(model):
    return [SimpleNamespace(index=i, params=list(m.parameters())) for i, m in enumerate(model)]


@pytest.mark.parametrize("optimizer,momentum,decay_1d", [("sgd", 0.9, False), ("sgd", 0.9, True), ("sgd", 0.0, True),
                                                          ("adamw", 0.9, False)])
def test_fused_step_is_bitwise_torch_optim_step_with_frozen_steps(optimizer, momentum, decay_1d):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3))
    twin = copy.deepcopy(model)
    trainer = SimpleNamespace(optimizer=optimizer, lr=0.1, momentum=momentum, nesterov=True, weight_decay=1e-2,
                              decay_1d=decay_1d, betas=(0.9, 0.99))
    lrs, twin_lrs = torch.zeros(2, 3), torch.zeros(2, 3)
    ours = layer_optimizer(layers_of(model), lrs, trainer, scale_1d=True)
    theirs = layer_optimizer(layers_of(twin), twin_lrs, trainer, scale_1d=True)
    assert len(ours.param_groups) == (3 if decay_1d else 5)  # without decay on 1-D: Linear -> kernel, bias groups
    step = FusedStep(ours)
    for t in range(6):
        scales = torch.rand(2, 3)
        lrs.copy_(scales)
        twin_lrs.copy_(scales)
        x = torch.randn(8, 5)
        for m in (model, twin):
            for p in m[0].parameters():   # the first layer is frozen at steps 2 and 3
                p.requires_grad_(t not in (2, 3))
            m(x).square().mean().backward()
        step.step()
        theirs.step()
        for m in (model, twin):
            for p in m.parameters():
                p.grad = None
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters())), t
    # and the state torch keeps (momentum / moments / step counts) is the same
    for p, q in zip(model.parameters(), twin.parameters()):
        for key, value in theirs.state[q].items():
            assert torch.equal(ours.state[p][key], value), key


def test_fused_step_refuses_what_it_does_not_implement():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="dampening"):
        FusedStep(torch.optim.SGD([p], lr=0.1, momentum=0.9, dampening=0.5, fused=True))
