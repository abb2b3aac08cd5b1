"""Per-layer reductions in a fixed number of launches agree with the tensor-by-tensor sums."""
import pytest
import torch

from meta_llr.per_layer import PerLayer


@pytest.mark.parametrize("fused", [True, False])  # True: the GPU's fixed-launch path, run on the CPU
def test_per_layer_norms_sums_and_dots_match_direct_computation(fused):
    torch.manual_seed(0)
    shapes = [(4, 3, 3, 3), (4,), (7, 4), (2, 2), (3,)]
    layer_of = [0, 0, 2, 2, 3]               # layer 1 has no tensors: its values are 0
    a = [torch.randn(s, dtype=torch.float64).float() for s in shapes]
    b = [torch.randn(s) for s in shapes]
    per_layer = PerLayer(a, layer_of, 4, torch.device("cpu"), fused=fused)

    def direct(fn):
        out = torch.zeros(4, dtype=torch.float64)
        for t, u, layer in zip(a, b, layer_of):
            out[layer] += fn(t.double(), u.double())
        return out

    assert torch.allclose(per_layer.total(a).double(), direct(lambda t, u: t.sum()), atol=1e-5)
    assert torch.allclose(per_layer.dot_of_flat(per_layer.flat(a), per_layer.flat(b)).double(), direct(lambda t, u: (t * u).sum()), atol=1e-5)
    assert torch.allclose(per_layer.sum_sq(a).double(), direct(lambda t, u: (t * t).sum()), atol=1e-4)
    assert torch.allclose(per_layer.norm(a).double(), direct(lambda t, u: (t * t).sum()).sqrt(), atol=1e-5)
    assert torch.allclose(per_layer.norm(a, 1).double(), direct(lambda t, u: t.abs().sum()), atol=1e-4)
    assert per_layer.total(a)[1] == 0 and per_layer.norm(a)[1] == 0


def test_fused_per_layer_sum_accumulates_in_float64():
    big = torch.full((1000,), 1e8)
    small = torch.ones(1000)
    per_layer = PerLayer([big, small, -big], [0, 0, 0], 1, torch.device("cpu"), fused=True)
    assert per_layer.total([big, small, -big]).item() == 1000.0


def test_per_layer_refuses_tensors_out_of_layer_order_or_of_another_size():
    with pytest.raises(ValueError, match="layer order"):
        PerLayer([torch.zeros(2), torch.zeros(2)], [1, 0], 2, torch.device("cpu"))
    per_layer = PerLayer([torch.zeros(2)], [0], 1, torch.device("cpu"), fused=True)
    with pytest.raises(ValueError, match="expected 2 elements"):
        per_layer.total([torch.zeros(3)])


@pytest.mark.parametrize("fused", [True, False])
def test_flat_round_trips_channels_last_kernels_and_expands_per_layer_values(fused):
    torch.manual_seed(1)
    kernel = torch.randn(4, 3, 2, 2).contiguous(memory_format=torch.channels_last)
    tensors = [kernel, torch.randn(5), torch.randn(2, 3)]
    per_layer = PerLayer(tensors, [0, 0, 1], 2, torch.device("cpu"), fused=fused)
    flat = per_layer.flat(tensors)
    assert flat.shape == (48 + 5 + 6,)
    # the kernel is flattened in its memory order: its piece is a view of its storage order
    assert torch.equal(flat[:48], kernel.permute(0, 2, 3, 1).reshape(-1))
    targets = [torch.zeros_like(t) for t in tensors]
    per_layer.unflat_into(flat * 2, targets)
    assert all(torch.equal(t, 2 * s) for t, s in zip(targets, tensors))
    assert targets[0].is_contiguous(memory_format=torch.channels_last)
    scaled = per_layer.scale_(flat.clone(), torch.tensor([3.0, -1.0]))
    assert torch.equal(scaled, torch.cat([3 * flat[:53], -flat[53:]]))
    assert torch.allclose(per_layer.total_of_flat(scaled), torch.tensor([3 * flat[:53].sum(), -flat[53:].sum()]))
    assert torch.allclose(per_layer.dot_of_flat(flat, scaled), torch.stack([3 * flat[:53].square().sum(),
                                                                            -flat[53:].square().sum()]))
