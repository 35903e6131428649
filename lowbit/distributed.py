"""Several processes, one per device, through torch.distributed (NCCL on GPUs, gloo on CPUs).

Launched by torchrun (`torchrun --nproc-per-node N -m lowbit quantize ...`); the CLI reads the
environment and calls `init`. Every helper here is the identity for one process, so plumbing calls
them unconditionally and the single-process path stays the reference.

How quantization splits (see model/layer.py and pipeline.py): calibration batch j lives on rank
j mod N; statistics are summed over ranks; independent per-linear work (a GPTQ solve per
distinct input, an AWQ clipping search per linear) runs on one rank and is broadcast; rank 0
alone writes files.
"""
from __future__ import annotations

import io
import logging
import pickle
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Sequence, TypeVar

import torch
import torch.distributed as tdist

from .errors import LowbitError

log = logging.getLogger(__name__)

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class Dist:
    """This process's place in the group. `device`: where collectives run (a GPU for NCCL, cpu for gloo)."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owner(self, batch: int) -> int:
        """The rank that holds calibration batch `batch`."""
        return batch % self.world


def init(rank: int, world: int, local_rank: int, device: str) -> Dist:
    """Join the process group torchrun set up (MASTER_ADDR/PORT come through its env:// rendezvous).

    device "cuda" means this rank's GPU, cuda:<local_rank>, and the NCCL backend; "cpu" means gloo.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available() or torch.cuda.device_count() <= local_rank:
            raise LowbitError(f"rank {rank} needs GPU {local_rank} but sees {torch.cuda.device_count()} GPU(s)")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        backend = "gloo"
    if not tdist.is_initialized():
        tdist.init_process_group(backend, rank=rank, world_size=world,
                                 **({"device_id": dev} if backend == "nccl" else {}))
    log.info("rank %d of %d on %s (%s)", rank, world, dev, backend)
    return Dist(rank, world, local_rank, dev)


def shutdown() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


# -- collectives (all identity for dist None) ------------------------------------------------------
def all_sum(dist: Dist | None, x: T) -> T:
    """Sum of `x` (a tensor or an int) over ranks; every rank gets the result."""
    if dist is None:
        return x
    if isinstance(x, torch.Tensor):
        t = x.to(dist.device, copy=True)
        tdist.all_reduce(t)
        return t.to(x.device)  # type: ignore[return-value]
    t = torch.tensor([x], dtype=torch.int64, device=dist.device)
    tdist.all_reduce(t)
    return int(t.item())  # type: ignore[return-value]


def broadcast(dist: Dist | None, obj: T, src: int) -> T:
    """Rank `src`'s `obj` on every rank. Any picklable structure; its tensors travel as raw bytes
    through the backend (bit-exact, any dtype) and land on this rank's device if they were on a GPU."""
    if dist is None or dist.world == 1:
        return obj
    if dist.rank == src:
        tensors: list[torch.Tensor] = []
        buf = io.BytesIO()
        pickler = pickle.Pickler(buf)
        pickler.persistent_id = lambda o: (tensors.append(o), len(tensors) - 1)[1] \
            if isinstance(o, torch.Tensor) else None
        pickler.dump(obj)
        header = [buf.getvalue(), [(tuple(t.shape), t.dtype, t.device.type) for t in tensors]]
    box = [header if dist.rank == src else None]
    tdist.broadcast_object_list(box, src=src, device=dist.device)
    payload, specs = box[0]
    out: list[torch.Tensor] = []
    for k, (shape, dtype, kind) in enumerate(specs):
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if dist.rank == src:
            t = tensors[k].detach().contiguous()
            raw = t.reshape(-1).view(torch.uint8).to(dist.device) if nbytes else None
        else:
            raw = torch.empty(nbytes, dtype=torch.uint8, device=dist.device) if nbytes else None
        if raw is not None:
            tdist.broadcast(raw, src=src)
        if dist.rank == src:
            out.append(tensors[k])
            continue
        home = dist.device if kind != "cpu" else torch.device("cpu")
        t = raw.to(home).view(dtype).reshape(shape) if raw is not None else torch.empty(shape, dtype=dtype, device=home)
        out.append(t)
    if dist.rank == src:
        return obj
    unpickler = pickle.Unpickler(io.BytesIO(payload))
    unpickler.persistent_load = lambda pid: out[pid]
    return unpickler.load()


def all_gather(dist: Dist | None, obj: T) -> list[T]:
    """Every rank's `obj` (small, picklable), in rank order."""
    if dist is None:
        return [obj]
    box: list[Any] = [None] * dist.world
    tdist.all_gather_object(box, obj)
    return box


def assign(keys: Sequence[K], cost: Callable[[K], float], world: int) -> dict[K, int]:
    """Keys to ranks, most expensive first to the least loaded rank (ties: lowest rank); deterministic."""
    load = [0.0] * world
    owner: dict[K, int] = {}
    for k in sorted(keys, key=lambda k: -cost(k)):  # stable: equal costs keep their order
        r = min(range(world), key=lambda r: (load[r], r))
        owner[k] = r
        load[r] += cost(k)
    return owner


def map_keys(dist: Dist | None, keys: Sequence[K], fn: Callable[[K], T],
             cost: Callable[[K], float] = lambda k: 1.0) -> dict[K, T]:
    """{k: fn(k)} on every rank, each fn(k) computed once by the rank `assign` gives it, then broadcast."""
    if dist is None or dist.world == 1:
        return {k: fn(k) for k in keys}
    owner = assign(keys, cost, dist.world)
    mine = {k: fn(k) for k in keys if owner[k] == dist.rank}
    return {k: broadcast(dist, mine.get(k), owner[k]) for k in keys}
