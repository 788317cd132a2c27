"""torchrun process groups (NCCL on GPUs, gloo on CPUs) and the collectives the objectives use."""
import dataclasses
import datetime
import os

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place in a run: ``size`` 1 is a plain single process (no process group)."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: str = "cpu"  # where collectives' tensors live (NCCL: this rank's GPU)

    @property
    def main(self) -> bool:
        return self.rank == 0


def init(device: str) -> World:
    """Joins torchrun's process group when started by torchrun (WORLD_SIZE > 1); returns the world."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=60))
    return World(rank, size, local, f"cuda:{local}" if device.startswith("cuda") else "cpu")


def device_for(device: str, world: World) -> str:
    """Each rank's own GPU (``cuda`` -> ``cuda:LOCAL_RANK``); CPUs are shared."""
    return f"cuda:{world.local_rank}" if device == "cuda" and world.size > 1 else device


def gather(t: torch.Tensor, world: World, grad: bool = False) -> torch.Tensor:
    """Every rank's ``t`` (same shape on each), concatenated in rank order along dim 0. ``grad``:
    gradients flow back to each rank's own part (summed over the ranks' losses)."""
    if world.size == 1:
        return t
    if grad:
        return torch.cat(dist_fn.all_gather(t))
    parts = [torch.empty_like(t) for _ in range(world.size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def total(value: float, world: World) -> float:
    """The sum of a number over the ranks."""
    if world.size == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=world.device)
    dist.all_reduce(t)
    return float(t.item())


def broadcast(value: float, world: World) -> float:
    """Rank 0's value (a clock reading, a decision), the same on every rank."""
    if world.size == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=world.device)
    dist.broadcast(t, 0)
    return float(t.item())


def broadcast_flag(flag: bool, world: World) -> bool:
    """Rank 0's decision (stop, out of time), the same on every rank."""
    return bool(broadcast(float(flag), world))


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def close(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
