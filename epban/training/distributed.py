"""DDP set-up under ``torchrun`` (NCCL on CUDA, gloo on the CPU) and the few collectives training needs."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # we created the process group, so we destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str | torch.device | None = None) -> DistContext:
    """Join the process group described by torchrun's environment (or one already initialised).

    Without ``WORLD_SIZE > 1`` this is a single process. ``device=None`` picks CUDA (the
    local rank's GPU) when available, else the CPU; ``"cuda"`` without an index is the local
    rank's GPU. Asking for CUDA where there is none is a ``ValueError``.
    """
    if device is not None and torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was asked for but CUDA is not available")
    if dist.is_available() and dist.is_initialized():
        rank, world, owns = dist.get_rank(), dist.get_world_size(), False
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        use_cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
        owns = True
    else:
        rank, world, local_rank, owns = 0, 1, 0, False
    if device is None:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    else:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return DistContext(rank, world, local_rank, device, owns)


def cleanup(ctx: DistContext) -> None:
    """Leave the process group if ``setup`` created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_gather_objects(ctx: DistContext, obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` without DDP)."""
    if not ctx.distributed:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def any_rank(ctx: DistContext, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (so all ranks stop at the same step)."""
    if not ctx.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=ctx.device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def sync_buffers(ctx: DistContext, module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers: BatchNorm running statistics drift apart under DDP
    (each rank updates them with its own batch), and evaluation must use one model."""
    if not ctx.distributed:
        return
    for buf in module.buffers():
        dist.broadcast(buf.data, src=0)


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (nothing without DDP)."""
    if ctx.distributed:
        dist.barrier()
