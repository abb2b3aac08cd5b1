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


@pytest.mark.parametrize("fused", [False, True])
def test_flat_view_is_a_view_of_a_block_and_a_copy_otherwise(fused):
    from meta_llr.optim import flatten_, zeros_laid_out_like

    torch.manual_seed(0)
    tensors = [torch.randn(4, 3, 2, 2).to(memory_format=torch.channels_last), torch.randn(5), torch.randn(2, 5)]
    flat = flatten_(tensors)  # the run's layout: one buffer, each tensor a view in memory order
    pl = PerLayer(tensors, [0, 0, 1], 2, torch.device("cpu"), fused=fused)
    assert pl.is_block(tensors)
    view = pl.flat_view(tensors)
    assert torch.equal(view, pl.flat(tensors)) and view.data_ptr() == flat.data_ptr()
    view.mul_(2)  # writes through to the tensors
    assert torch.equal(pl.flat(tensors), view)
    twins = zeros_laid_out_like(tensors, flat)  # the loop's copy before the step: the same layout
    assert pl.is_block(twins) and all(t.stride() == u.stride() for t, u in zip(tensors, twins))
    separate = [t.clone() for t in tensors]     # separate storages: a copy, unchanged by writes
    assert not pl.is_block(separate)
    copy = pl.flat_view(separate)
    copy.zero_()
    assert torch.equal(pl.flat(separate), pl.flat(tensors))


@pytest.mark.parametrize("fused", [False, True])
def test_expand_and_totals_of_flat_match_per_layer_slices(fused):
    torch.manual_seed(1)
    tensors = [torch.randn(3, 4), torch.randn(4), torch.randn(6), torch.randn(2, 2)]
    pl = PerLayer(tensors, [0, 0, 1, 2], 3, torch.device("cpu"), fused=fused)
    values = torch.tensor([2.0, -1.0, 0.5])
    expected = torch.cat([torch.full((16,), 2.0), torch.full((6,), -1.0), torch.full((4,), 0.5)])
    assert torch.equal(pl.expand(values), expected)
    a, b = pl.flat(tensors), pl.flat([t * t for t in tensors])
    totals = pl.totals_of_flat(torch.stack([a, b]))
    direct = torch.tensor([[x.sum().item() for x in v.split([16, 6, 4])] for v in (a, b)])
    torch.testing.assert_close(totals, direct, rtol=1e-6, atol=1e-6)
