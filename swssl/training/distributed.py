"""Training on several processes with torchrun (DDP): one process per device, the loss over the global batch.

`swssl-train` under `torchrun --nproc_per_node N` (or `--nnodes` / `--rdzv-endpoint` across machines)
finds torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and joins the process group: NCCL on
CUDA (one GPU per process, `cuda:LOCAL_RANK`), gloo on the CPU. Without torchrun nothing here is
used and training is one process, as before.

What makes N processes train like one process on the same windows:
- `train.batch_size` stays the global batch: each rank takes batch_size / N windows per step;
- the projector outputs of every rank are gathered with a differentiable all-gather
  (`torch.distributed.nn.functional.all_gather`), so the loss's batch standardisation and
  cross-correlation are those of the global batch. Every rank computes the same loss; the
  all-gather's backward sums each shard's gradient over the N ranks and DDP then averages the
  parameter gradients over the N ranks, which together give the one-process gradient;
- BatchNorm: with `train.sync_bn` (SyncBatchNorm) its batch statistics are those of the global
  batch too. Off by default: the official code, like any single-GPU run, normalises each view's
  batch on its own device, and syncing costs an all-reduce per BatchNorm layer and forward; with a
  per-rank batch of tens of windows the local statistics are close. Turn it on for exact
  equivalence with one process, or when the per-rank batch gets small (a few windows).
"""
from __future__ import annotations

import datetime
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from swssl.device import parse_device
from swssl.errors import ConfigError, SwsslError
from swssl.names import one_line

# Long enough for rank 0's validation and checkpointing while the others wait at a barrier.
TIMEOUT = datetime.timedelta(hours=6)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, logs, best.pt and the bank, and validates."""
        return self.rank == 0

    def on_main(self, action: Callable[[], object]) -> None:
        """Run `action` on rank 0 alone while the others wait; every rank raises when it failed, so that
        no rank waits for one that stopped (and rank 0 raises the error itself)."""
        failure = None
        if self.main:
            try:
                action()
            except SwsslError as exc:
                failure = exc
        if self.world > 1:
            shared = [None if failure is None else one_line(str(failure))]
            dist.broadcast_object_list(shared, src=0)
            if shared[0] is not None and not self.main:
                raise ConfigError(f"rank 0 stopped: {shared[0]}")
        if failure is not None:
            raise failure


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(device: str) -> tuple[Ranks, torch.device]:
    """The process group of a torchrun launch (NCCL on CUDA, gloo on the CPU) and this rank's device."""
    if not launched_by_torchrun():
        return Ranks(), parse_device(device)
    ranks = Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    wanted = parse_device(device)
    if wanted.type == "cuda":
        if ranks.local >= torch.cuda.device_count():
            raise ConfigError(f"torchrun started {ranks.local + 1}+ processes on this machine but it has "
                              f"{torch.cuda.device_count()} CUDA device(s); use --nproc_per_node "
                              f"{torch.cuda.device_count()} or fewer")
        wanted = torch.device("cuda", ranks.local)
        torch.cuda.set_device(wanted)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if wanted.type == "cuda" else "gloo", timeout=TIMEOUT)
    # torch.distributed.nn's differentiable collectives warn that they are deprecated in favour of a private
    # module; they are the documented public API, and the warning would repeat on every rank.
    warnings.filterwarnings("ignore", r"torch\.distributed\.nn\.functional\.\w+ is deprecated", FutureWarning)
    return ranks, wanted


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def per_rank_batch(batch_size: int, ranks: Ranks) -> int:
    """Each rank's share of the global batch, refused when it does not divide evenly."""
    if batch_size % ranks.world:
        raise ConfigError(f"train.batch_size {batch_size} is the global batch and must be a multiple of the "
                          f"{ranks.world} training processes")
    return batch_size // ranks.world


def gather(tensor: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """The rows of every rank, rank order, differentiable (one process: the tensor itself)."""
    if ranks.world == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor.contiguous()))


def wrap(forward: torch.nn.Module, ranks: Ranks, device: torch.device, sync_bn: bool) -> torch.nn.Module:
    """`forward` for this rank: as it is for one process, else with synchronised BatchNorm (`sync_bn`:
    torch's SyncBatchNorm on CUDA, `GlobalBatchNorm` on the CPU) and wrapped in DDP. The BatchNorm
    layers are replaced in place, sharing their parameters and running statistics, so the module
    that is checkpointed is the one that trains."""
    if ranks.world == 1:
        return forward
    if sync_bn:
        forward = (torch.nn.SyncBatchNorm.convert_sync_batchnorm(forward) if device.type == "cuda"
                   else GlobalBatchNorm.convert(forward))
    return torch.nn.parallel.DistributedDataParallel(forward, device_ids=[device.index] if device.type == "cuda"
                                                     else None)


class GlobalBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch of every rank, for the CPU, where torch's SyncBatchNorm refuses
    to run (it needs CUDA): in training, the per-channel sums of x (then of the squared deviations
    from the global mean) and the count are summed over the ranks with a differentiable all-reduce,
    giving the global mean and (biased) variance that normalise, and the running statistics as
    BatchNorm keeps them (unbiased variance). Outside
    training, or in one process, it is the plain BatchNorm it replaced."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (got {input.dim()}-D)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.track_running_stats and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        channels, dims = x.shape[1], [0, *range(2, x.dim())]
        shape = [1, channels] + [1] * (x.dim() - 2)
        count = torch.full((1,), x.numel() / channels, dtype=x.dtype, device=x.device)
        total = all_reduce(torch.cat([x.sum(dims), count]))
        n = total[-1]
        mean = total[:channels] / n
        var = all_reduce((x - mean.view(shape)).pow(2).sum(dims)) / n  # two passes, as BatchNorm: no cancellation
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            self.running_mean.mul_(1 - momentum).add_(momentum * mean)
            self.running_var.mul_(1 - momentum).add_(momentum * var * n / (n - 1))
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return out * self.weight.view(shape) + self.bias.view(shape) if self.affine else out

    @classmethod
    def convert(cls, module: torch.nn.Module) -> torch.nn.Module:
        """`module` with every BatchNorm layer (1-D, 2-D, 3-D) replaced by a GlobalBatchNorm sharing its
        parameters and buffers (as torch.nn.SyncBatchNorm.convert_sync_batchnorm does for CUDA)."""
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
            converted = cls(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats)
            if module.affine:
                converted.weight, converted.bias = module.weight, module.bias
            converted.running_mean, converted.running_var = module.running_mean, module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
            converted.train(module.training)
            return converted
        for name, child in module.named_children():
            module.add_module(name, cls.convert(child))
        return module
