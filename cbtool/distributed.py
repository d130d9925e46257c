"""torchrun support: read RANK/LOCAL_RANK/WORLD_SIZE, pick the device, reduce and gather across ranks."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str | None = None, local_rank: int = 0) -> torch.device:
    """The requested device, else CUDA (this rank's GPU), then MPS, then CPU."""
    from cbtool.errors import CbtoolError

    if requested:
        try:
            device = torch.device(requested)
        except RuntimeError:
            raise CbtoolError(f"unknown device {requested!r}: use cpu, cuda, cuda:N or mps") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise CbtoolError("--device cuda was asked for but CUDA is not available; use --device cpu")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def amp_dtype(device: torch.device) -> torch.dtype:
    """The autocast dtype for ``--amp``: bf16, or fp16 on a GPU without bf16 and on MPS."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (a no-op on CPU), so that timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def setup(device_request: str | None = None) -> tuple[DistInfo, torch.device]:
    """Join the torchrun process group when launched by torchrun; a no-op for a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world_size)
    device = pick_device(device_request, info.local_rank)
    if info.enabled and not dist.is_initialized():
        # torch._dynamo (which timm imports) keeps references to a process group that exists when it is
        # imported, so destroy_process_group could not free it: its gloo threads outlived Python and
        # sometimes aborted the exit of a rank (SIGABRT, torchrun failed). Import it before joining.
        import torch._dynamo  # noqa: F401

        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return info, device


def is_main_process() -> bool:
    """Whether this process is rank 0 of a torchrun job (or runs alone)."""
    return int(os.environ.get("RANK", "0")) == 0


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (a no-op outside torchrun); returns it."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def sum_over_ranks(value: int) -> int:
    """An integer count summed over ranks (itself outside torchrun)."""
    return int(all_reduce_sum(torch.tensor([value], dtype=torch.int64)).item())


def all_gather_objects(obj: object) -> list[object]:
    """Every rank's ``obj``, in rank order (``[obj]`` outside torchrun)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
