"""Data-parallel training across processes (torchrun), and the same code as one process without it.

`torchrun --nproc_per_node N -m training.cli train ...` (add `--nnodes M --rdzv-backend c10d
--rdzv-endpoint HOST:PORT` for several machines) sets RANK, LOCAL_RANK and WORLD_SIZE; this module
joins the process group (NCCL on GPUs, gloo on CPU) and offers the few collective steps the
training loop needs. Without those variables every call is the single-process identity.
"""
from __future__ import annotations

import os
import sys
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
    """Wait for every rank, then leave the process group.

    The barrier keeps a rank from exiting (and closing its connections) while another still
    finishes its last collective step. Leaving does not end gloo's threads once a
    DistributedDataParallel wrapper was built: DDP's reducer keeps the group alive
    (torch 2.13: 3 gloo threads after destroy_process_group with DDP, none without), so a
    worker should end with `exit_worker`.
    """
    if world.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def launched() -> bool:
    """True in a process that torchrun started as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def exit_worker(code: int) -> None:
    """End a torchrun worker now, with `code`, skipping the interpreter's teardown.

    The process group that DDP kept alive would otherwise be destroyed while Python and the
    C++ runtime shut down around gloo's live threads; that aborted rank 0 once in CI
    ("terminate called without an active exception", SIGABRT, exit -6) after a run that had
    finished and written everything. Standard streams are flushed first; every file the run
    writes is already closed.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
