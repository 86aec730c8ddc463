"""Data-parallel training across processes (torchrun), and the same code as one process without it.

`torchrun --nproc_per_node N -m training.cli train ...` (add `--nnodes M --rdzv-backend c10d
--rdzv-endpoint HOST:PORT` for several machines) sets RANK, LOCAL_RANK and WORLD_SIZE; this module
joins the process group (NCCL on GPUs, gloo on CPU) and offers the few collective steps the
training loop needs. Without those variables every call is the single-process identity.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes the run directory."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def mean(self, value: float) -> float:
        return float(sum(self.gather(value)) / self.size)


def join(device_type: str) -> World:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); else a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return World(rank=dist.get_rank(), local_rank=int(os.environ.get("LOCAL_RANK", "0")), size=dist.get_world_size())


def leave(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
