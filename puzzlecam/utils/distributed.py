"""Process-group setup, seeding and small collectives: the one place every command starts its group.

One code path serves every launcher: ``deepspeed``, ``torchrun`` and plain ``python`` all describe
the process through the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT);
a plain ``python`` run gets a one-process group on a free loopback port (or none, when the caller
asks for none). CPU runs use gloo, CUDA runs nccl.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from puzzlecam.errors import PuzzleCamError, RunError, UsageError
from puzzlecam.utils.net import free_port


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise UsageError(f"environment variable {name} must be an integer, got {raw!r}") from None


def avoid_deepspeed_cpu_builds() -> None:
    """Stop DeepSpeed from JIT-building its shared-memory comm op on CPU.

    On the CPU accelerator, DeepSpeed's torch comm backend compiles ``deepspeed_shm_comm`` (~45-80 s
    on 2 cores, cached in ~/.cache/torch_extensions) when its process group starts. That op serves
    only ``inference_all_reduce``; training all-reduces go through torch.distributed (gloo), so the
    build buys nothing here. Marking the op incompatible makes DeepSpeed skip it.
    Set PUZZLECAM_DS_SHM=1 to keep DeepSpeed's default.
    """
    if os.environ.get("PUZZLECAM_DS_SHM", "0") == "1" or torch.cuda.is_available():
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _device_for(spec: torch.device | str | None, local_rank: int, flag: str) -> torch.device:
    """``None``: cuda:LOCAL_RANK when CUDA is available, else cpu; a bare ``cuda``: cuda:LOCAL_RANK.

    A spec that is not cpu, cuda or cuda:N of this machine is a UsageError naming ``flag``.
    """
    if spec is None:
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UsageError(f"{flag} {spec!r}: expected cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{flag} {spec}: CUDA is not available on this machine (use cpu)")
        count = torch.cuda.device_count()
        if device.index is None:
            device = torch.device("cuda", local_rank % count)
        elif device.index >= count:
            raise UsageError(f"{flag} {spec}: this machine has {count} CUDA device(s)")
    return device


def init_distributed(
    device: torch.device | str | None = None,
    *,
    use_deepspeed: bool = False,
    single_process_group: bool = True,
    device_flag: str = "--device",
) -> DistInfo:
    """Join (or create) the process group described by the environment; returns this process's place.

    ``device``: where this process computes (default: cuda:LOCAL_RANK when CUDA is available, else
    cpu); it decides the backend (nccl for CUDA, gloo for cpu). ``use_deepspeed``: start the group
    through DeepSpeed (the trainer). ``single_process_group=False``: a process that no launcher
    started (no RANK / WORLD_SIZE) gets no group at all and works alone (inference). A bad ``device``
    is a UsageError naming ``device_flag``.
    """
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if not launched and not single_process_group:
        return DistInfo(rank=0, world_size=1, local_rank=0, device=_device_for(device, 0, device_flag))
    if not launched:
        # Plain `python launch/train.py`: a one-process group, so that every code path is the same.
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    device = _device_for(device, local_rank, device_flag)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        restart = _env_int("TORCHELASTIC_RESTART_COUNT", 0)
        if restart > 0:
            # torchrun restarted the workers: the store outlives the dead attempt and still holds its
            # process-group keys (gloo would connect to the dead workers' addresses). Give every
            # attempt its own key namespace.
            agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            store = dist.TCPStore(
                os.environ["MASTER_ADDR"],
                _env_int("MASTER_PORT", 29500),
                world_size,
                is_master=rank == 0 and not agent_store,
                wait_for_workers=False,
            )
            dist.init_process_group(
                backend=backend,
                store=dist.PrefixStore(f"puzzlecam_attempt{restart}", store),
                rank=rank,
                world_size=world_size,
            )
        if use_deepspeed:
            import deepspeed

            avoid_deepspeed_cpu_builds()
            # Wraps the group when it already exists.
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        elif not dist.is_initialized():
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device)


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all ranks in place (a no-op alone); gloo needs CPU tensors, nccl CUDA ones."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def sum_across_ranks(values: list[int]) -> list[int]:
    """Integer counters summed over all ranks (every rank gets the totals)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [int(v) for v in t.tolist()]


def average_buffers(module: torch.nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over all ranks, in place.

    Under data parallelism each rank updates its own running statistics; parameters stay identical
    but buffers drift apart. Averaging them before a checkpoint or an export makes the saved model
    (written by rank 0) describe every rank's data and keeps all ranks equal after a resume.
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    world = dist.get_world_size()
    for buf in module.buffers():
        if buf.is_floating_point():
            acc = buf.detach().float()
            dist.all_reduce(acc, op=dist.ReduceOp.SUM)
            buf.copy_(acc / world)


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch from (seed, rank): ranks differ, runs repeat."""
    mixed = int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
    random.seed(mixed)
    np.random.seed(mixed)
    torch.manual_seed(mixed)


def rng_state() -> dict:
    """Every RNG state this process uses, as tensors and plain values (loadable with weights_only)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_to_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def raise_if_any_rank_failed(
    failed: PuzzleCamError | None, on_failure: Callable[[], None] | None = None, context: str = ""
) -> None:
    """A collective: when any rank failed, every rank raises -- its own error, else the first failed
    rank's message (a UsageError or RunError by its exit status) -- so that no rank goes on to wait in
    a collective for one that gave up. ``on_failure`` runs first; ``context`` ends the message."""
    mine = None if failed is None else (failed.exit_code, str(failed))
    reports = [mine]
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        reports = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(reports, mine)
    first = next(((rank, report) for rank, report in enumerate(reports) if report is not None), None)
    if first is None:
        return
    if on_failure is not None:
        on_failure()
    suffix = f"; {context}" if context else ""
    if failed is not None:
        raise type(failed)(f"{failed}{suffix}") from failed
    rank, (code, message) = first
    raise (UsageError if code == UsageError.exit_code else RunError)(f"rank {rank}: {message}{suffix}")
