"""Data-parallel runs under ``torchrun``: which process this is, and the few collectives the
loop needs.

``torchrun --nproc_per_node=N -m meta_llr.train ...`` starts N processes (ranks) with
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set; :func:`setup` joins them into one process
group (NCCL on GPUs, gloo on CPU) and gives each rank its device (``cuda:LOCAL_RANK``). The
loop (``meta_llr/run.py``) then keeps these invariants, so every rank computes the same run:

* ``trainer.batch_size`` is the global batch: every rank draws the same permutation and
  augmentation (same generator) and trains on its shard ``batch[rank::N]``;
  DistributedDataParallel averages the gradients;
* the step's loss and correct count are all-reduced (one collective on the device, no host
  sync), so records, divergence checks and the ``loss`` statistic are the global batch's on
  every rank;
* the per-layer scales are broadcast from rank 0 each step (on the device), so every rank
  applies identical per-layer LRs whatever the controller computed locally; a controller that
  computes on this rank's shard beyond the statistics (``loss_at``: ``hessian_secant``'s
  Hessian-vector products) averages its result over ranks with ``Plan.reduce``, so it measures
  the global batch; the lookahead's batches come from one generator seeded alike on every
  rank, so it computes the same on all;
* evaluation is sharded and its sums all-reduced; a stop signal is agreed on at log points;
* only rank 0 writes records, checkpoints and logs; every rank resumes from rank 0's
  checkpoint, and all have looked at the run directory before rank 0 writes to it (a
  barrier at the start of ``fit``).

Without ``torchrun`` (``WORLD_SIZE`` unset or 1) :data:`SINGLE` is used and none of this
costs anything.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's part of a global batch."""
        return batch[self.rank::self.world_size] if self.active else batch

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(tensor)
        return tensor

    def mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean over ranks, in place (``Plan.reduce`` under torchrun)."""
        return self.sum_(tensor).div_(self.world_size)

    def max_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def broadcast_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.broadcast(tensor, src=0)
        return tensor


SINGLE = Distributed()


def setup(device: str) -> tuple[Distributed, str]:
    """Join the ``torchrun`` process group when there is one; returns it and the device name
    this rank uses (``cuda:LOCAL_RANK`` for ``device=auto|cuda`` on GPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE, device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Distributed(rank=rank, world_size=world, local_rank=local), device
