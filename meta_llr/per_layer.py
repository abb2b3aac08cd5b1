"""Per-layer reductions of a list of tensors, in a fixed number of kernel launches.

The statistics of the loop and of the controllers are per layer, over all of a layer's tensors
(kernel, bias, BatchNorm scale and shift): ``‖g_l‖``, ``Σ|θ_l|``, ``g_l·u_l``. Computing them
tensor by tensor costs one or two launches per tensor (≈170 for a ResNet-56), which on a GPU is
host time the step waits for. Here a norm is one ``torch._foreach_norm`` plus a segmented sum
into ``[L]`` (``torch.segment_reduce``), and on a GPU a sum (hence a dot product) is one
concatenation and one float64 segmented sum over the layers' elements, whatever the number
of tensors; no host sync. On a
CPU, where an op costs no launch but a float64 scan costs ~10 ns per element (20 ms for
fastnet's 2M parameters, against 0.3 ms for per-tensor sums), sums are taken per tensor or per
layer slice instead (``fused=False``, the default off CUDA); both give the same values.

Element-wise work over all tensors with per-layer coefficients is done on the flat vector
(:meth:`PerLayer.flat`, :meth:`PerLayer.scale_`) and written back with one
``torch._foreach_copy_`` (:meth:`PerLayer.unflat_into`). Tensors that already lie back to back
in one buffer, in order (the run's parameters and its copy of them before the step:
``meta_llr.optim.flatten_``), are read as that buffer's slice with no copy
(:meth:`PerLayer.flat_view`). Several per-layer sums or norms at once are one segmented
reduction (:meth:`PerLayer.totals_of_flat`, :meth:`PerLayer.totals`, :meth:`PerLayer.norms`). Each tensor is flattened in the memory
order of the tensors given at construction (channels_last kernels stay views), the same order
for every list of the same shapes, so two flat vectors can be multiplied element by element.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


class PerLayer:
    """Reductions over ``tensors`` (fixed shapes, in layer order) into one value per layer.

    ``layer_of[i]`` is the layer of ``tensors[i]``; a layer's tensors must be consecutive.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], layer_of: Sequence[int], num_layers: int,
                 device: torch.device, fused: bool | None = None):
        if any(b < a for a, b in zip(layer_of, layer_of[1:])):
            raise ValueError("PerLayer needs the tensors in layer order")
        self.tensors, self.num_layers = list(tensors), num_layers
        self.tensor_layer = torch.tensor(list(layer_of), dtype=torch.long, device=device)
        self.tensor_counts = torch.bincount(torch.tensor(list(layer_of), dtype=torch.long),
                                            minlength=num_layers).to(device)  # tensors per layer
        counts = [0] * num_layers
        for t, layer in zip(tensors, layer_of):
            counts[layer] += t.numel()
        bounds = [0]
        for count in counts:
            bounds.append(bounds[-1] + count)
        self.numel = bounds[-1]
        self.bounds = torch.tensor(bounds, dtype=torch.long, device=device)  # layer l: [bounds[l], bounds[l+1])
        self.layer_sizes = counts
        self.layer_numel = torch.tensor(counts, dtype=torch.long, device=device)
        self.fused = torch.device(device).type == "cuda" if fused is None else fused
        # memory order of each tensor: dims by decreasing stride (a permutation; identity if contiguous)
        self.orders = [sorted(range(t.dim()), key=lambda d, t=t: (-t.stride(d), d)) for t in tensors]
        self.inverses = [sorted(range(len(order)), key=order.__getitem__) for order in self.orders]
        self.ordered_shapes = [[t.shape[d] for d in order] for t, order in zip(tensors, self.orders)]
        self.sizes = [t.numel() for t in tensors]
        self.lengths_by_rows: dict[tuple[str, int], torch.Tensor] = {}

    @classmethod
    def of_layers(cls, layers: Sequence, device: torch.device, keep=None) -> PerLayer:
        """Over the layers' parameters (those with ``keep(p)`` true), available as ``.tensors``."""
        chosen = [(p, layer.index) for layer in layers for p in layer.params if keep is None or keep(p)]
        return cls([p for p, _ in chosen], [i for _, i in chosen], len(layers), device)

    def combine(self, per_tensor: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Sum per-tensor values (a ``[T]`` tensor or a list of 0-d tensors) into ``[L]``, or
        ``[K, T]`` (K lists' values side by side) into ``[K, L]``."""
        values = per_tensor if isinstance(per_tensor, torch.Tensor) else torch.stack(list(per_tensor))
        if values.dtype != torch.float32:
            values = values.float()
        if values.dim() == 1:
            return torch.segment_reduce(values, "sum", lengths=self.tensor_counts)  # one op, in tensor order
        return torch.segment_reduce(values, "sum", lengths=self._lengths("tensor_counts", values.shape[0]), axis=1)

    def _lengths(self, name: str, rows: int) -> torch.Tensor:
        """``self.<name>`` (segment lengths) repeated for ``rows`` rows, for ``segment_reduce``
        along axis 1; built once per shape, on the CPU path too, so that a step's launches on
        the GPU path (``fused``) do not depend on whether an earlier step took it."""
        if (name, rows) not in self.lengths_by_rows:
            self.lengths_by_rows[name, rows] = getattr(self, name).expand(rows, self.num_layers).contiguous()
        return self.lengths_by_rows[name, rows]

    def sum_sq(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """``Σ x²`` over each layer's elements."""
        values = torch.stack(torch._foreach_norm(list(tensors))).float()
        return self.combine(values * values)

    def norms(self, *lists: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[K, L]``: each layer's 2-norm in each of K lists of tensors (one ``_foreach_norm``
        and one segmented sum for all K: 5 ops whatever K)."""
        values = torch.stack(torch._foreach_norm([t for tensors in lists for t in tensors])).float()
        return self.combine((values * values).view(len(lists), -1)).sqrt_()

    def norm(self, tensors: Sequence[torch.Tensor], p: float = 2) -> torch.Tensor:
        """The p-norm (p = 1 or 2) of each layer's elements."""
        if p == 2:
            return self.sum_sq(tensors).sqrt_()
        if p == 1:
            return self.combine(torch._foreach_norm(list(tensors), 1))
        raise ValueError(f"p must be 1 or 2, got {p}")

    def flat(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """All elements in one vector, layer after layer (one copy)."""
        return torch.cat([t.permute(order).reshape(-1) for t, order in zip(tensors, self.orders)])

    def is_block(self, tensors: Sequence[torch.Tensor]) -> bool:
        """Whether ``tensors`` lie back to back in one buffer, in this order and memory layout."""
        first = tensors[0]
        storage, offset = first.untyped_storage().data_ptr(), first.storage_offset()
        for t, order, size in zip(tensors, self.orders, self.sizes):
            if (t.untyped_storage().data_ptr() != storage or t.storage_offset() != offset
                    or not t.permute(order).is_contiguous()):
                return False
            offset += size
        return True

    def flat_view(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """:meth:`flat`'s vector: a view of the tensors' buffer when they form a block
        (:meth:`is_block`; no op, and writing to it writes to them), else a copy."""
        if self.is_block(tensors):
            return tensors[0].as_strided((self.numel,), (1,), tensors[0].storage_offset())
        return self.flat(tensors)

    def expand(self, per_layer: torch.Tensor) -> torch.Tensor:
        """``[..., L]`` -> ``[..., numel]``: each element gets its layer's value
        (``repeat_interleave`` with the output size given: two ops, no host sync, and no index
        kept between calls: an element-to-layer index would cost 4 bytes per parameter for good)."""
        return torch.repeat_interleave(per_layer, self.layer_numel, dim=-1, output_size=self.numel)

    def unflat_into(self, flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
        """Copy a vector laid out as :meth:`flat` lays it out back into ``tensors`` (one call)."""
        views = [piece.view(shape).permute(inverse)
                 for piece, shape, inverse in zip(flat.split(self.sizes), self.ordered_shapes, self.inverses)]
        torch._foreach_copy_(list(tensors), views)

    def scale_(self, flat: torch.Tensor, per_layer: torch.Tensor) -> torch.Tensor:
        """Multiply, in place, each layer's part of a flat vector by its entry of ``per_layer``."""
        if self.fused:  # one [L] -> [numel] gather and one multiply
            return flat.mul_(self.expand(per_layer))
        for piece, value in zip(flat.split(self.layer_sizes), per_layer.unbind()):
            piece.mul_(value)
        return flat

    def dot_of_flat(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-layer dot products of two vectors laid out as :meth:`flat` lays them out."""
        if self.fused:
            return self.total_of_flat(a * b)
        return torch.stack([torch.dot(x, y) for x, y in zip(a.split(self.layer_sizes), b.split(self.layer_sizes))])

    def total_of_flat(self, flat: torch.Tensor) -> torch.Tensor:
        """Per-layer sums of a vector laid out as :meth:`flat` lays it out."""
        if flat.numel() != self.numel:
            raise ValueError(f"expected {self.numel} elements, got {flat.numel()}")
        if not self.fused:
            return torch.stack([piece.sum() for piece in flat.split(self.layer_sizes)]).float()
        # one segmented reduction, in float64: each layer's elements summed on their own
        return torch.segment_reduce(flat.double(), "sum", lengths=self.layer_numel).float()

    def totals_of_flat(self, stacked: torch.Tensor) -> torch.Tensor:
        """``[K, numel]`` (K vectors laid out as :meth:`flat` lays them out) -> ``[K, L]`` per-layer
        sums: one float64 segmented reduction for all K on a GPU."""
        lengths = self._lengths("layer_numel", stacked.shape[0])   # (built on either path)
        if not self.fused:
            return torch.stack([self.total_of_flat(row) for row in stacked.unbind()])
        return torch.segment_reduce(stacked.double(), "sum", lengths=lengths, axis=1).float()

    def totals(self, *lists: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[K, L]``: the sum of each layer's elements in each of K lists of tensors (on a GPU one
        concatenation and one float64 segmented sum for all K)."""
        if not self.fused:
            self._lengths("layer_numel", len(lists))
            return torch.stack([self.total(tensors) for tensors in lists])
        pieces = [t.permute(order).reshape(-1) for tensors in lists for t, order in zip(tensors, self.orders)]
        return self.totals_of_flat(torch.cat(pieces).view(len(lists), -1))

    def total(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """The sum of each layer's elements."""
        if not self.fused:
            return self.combine([t.sum() for t in tensors])
        return self.total_of_flat(self.flat(tensors))
