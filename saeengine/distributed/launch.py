"""From the environment ``torchrun`` sets to an initialized process group and this rank's
:class:`~saeengine.distributed.mesh.Mesh`, and back (``destroy_process_group``).

``torchrun --nproc-per-node N`` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT in each of its N processes. :func:`distributed` reads them:

- backend and device: NCCL and ``cuda:LOCAL_RANK`` when CUDA is available and the run's
  device is "cuda" or "auto"; gloo and the CPU otherwise (device "cpu", or no GPU);
- the mesh's data x latent must equal WORLD_SIZE (InputError naming both and the fix);
  without torchrun (WORLD_SIZE unset) only a 1 x 1 mesh runs, as one plain process
  (:meth:`Mesh.single`: no process group at all);
- the collective timeout: ``timeout_s``, else the environment variable
  SAEENGINE_DIST_TIMEOUT_S, else 600 s (a peer that died mid-collective makes the others
  fail after it instead of hanging; torchrun also stops the others when one exits).

A process group that was already initialized (by the caller, or a test harness) is used
as it is and left initialized; one that :func:`distributed` initialized is destroyed when
its ``with`` block ends, also on an error.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Iterator

import torch
import torch.distributed as dist

from ..errors import ConfigError, InputError
from .mesh import Mesh, MeshSpec, init_mesh, parse_mesh

TIMEOUT_ENV = "SAEENGINE_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launch_hint(world: int) -> str:
    return f"torchrun --nproc-per-node {world} -m saeengine train ... --mesh ..."


def world_from_env() -> int | None:
    """WORLD_SIZE as torchrun sets it, or None when this process was not started by it."""
    value = os.environ.get("WORLD_SIZE")
    if value is None:
        return None
    try:
        world = int(value)
    except ValueError:
        raise InputError(f"WORLD_SIZE={value!r} is not a whole number; start the processes with torchrun, which "
                         "sets it") from None
    if world < 1:
        raise InputError(f"WORLD_SIZE={world} must be >= 1; start the processes with torchrun, which sets it")
    return world


def check_world(spec: MeshSpec, world: int | None) -> None:
    """InputError unless a run of mesh ``spec`` can start in a world of ``world`` processes
    (None: no torchrun, so one process)."""
    if world is None:
        if spec.world_size > 1:
            raise InputError(f"--mesh {spec} needs data x latent = {spec.data} x {spec.latent} = {spec.world_size} "
                             f"processes, but this is one process started without torchrun (WORLD_SIZE is not set); "
                             f"launch with `torchrun --nproc-per-node {spec.world_size} -m saeengine train ...` "
                             "(same arguments), or use --mesh data=1,latent=1")
        return
    if world != spec.world_size:
        raise InputError(f"--mesh {spec} needs data x latent = {spec.data} x {spec.latent} = {spec.world_size} "
                         f"processes, but torchrun started {world} (WORLD_SIZE={world}); launch with "
                         f"`torchrun --nproc-per-node {spec.world_size} -m saeengine train ...`, or choose a mesh "
                         f"whose data x latent is {world}")


def backend_and_device(device: str = "auto") -> tuple[str, torch.device]:
    """(backend, this rank's device) for a TrainConfig.device under torchrun: NCCL and
    cuda:LOCAL_RANK for "cuda"/"auto" with CUDA available, gloo and the CPU for "cpu" or
    "auto" without CUDA. ConfigError for "cuda" without a GPU for this rank, and for
    "cuda:N" (under torchrun each rank takes cuda:LOCAL_RANK)."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cpu":
        return "gloo", torch.device("cpu")
    if device not in ("auto", "cuda"):
        if torch.device(device).type == "cuda":
            raise ConfigError(f"TrainConfig.device={device!r}: under torchrun each rank uses cuda:LOCAL_RANK; "
                              "pass device='cuda' (or 'auto'), and choose the GPUs with CUDA_VISIBLE_DEVICES")
        raise ConfigError(f"TrainConfig.device={device!r}: a sharded run trains on 'cpu', 'cuda' or 'auto'")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        if device == "cuda":
            raise ConfigError("TrainConfig.device='cuda' but torch.cuda.is_available() is False on this machine; "
                              "use device='cpu' (gloo) or 'auto'")
        return "gloo", torch.device("cpu")
    if local >= count:
        raise ConfigError(f"LOCAL_RANK={local} has no GPU: this machine has {count} visible CUDA device(s); start "
                          f"at most {count} processes per node (torchrun --nproc-per-node {count})")
    return "nccl", torch.device("cuda", local)


def _timeout(timeout_s: float | None) -> datetime.timedelta:
    if timeout_s is None:
        text = os.environ.get(TIMEOUT_ENV)
        try:
            timeout_s = float(text) if text else DEFAULT_TIMEOUT_S
        except ValueError:
            raise InputError(f"{TIMEOUT_ENV}={text!r} is not a number of seconds") from None
    if not timeout_s > 0:
        raise InputError(f"the collective timeout must be > 0 seconds, got {timeout_s!r}")
    return datetime.timedelta(seconds=timeout_s)


@contextlib.contextmanager
def distributed(mesh: MeshSpec | str, device: str = "auto", *, timeout_s: float | None = None) -> Iterator[Mesh]:
    """``with distributed("data=2,latent=2", cfg.device) as mesh:`` this rank's Mesh, in a
    process group initialized from torchrun's environment (module docstring); the group is
    destroyed at the end of the block if this call initialized it."""
    spec = parse_mesh(mesh)
    owned = False
    if dist.is_initialized():  # the caller's group: check it, use it, leave it
        check_world(spec, dist.get_world_size())
        _, dev = backend_and_device(device) if dist.get_backend() == "nccl" else ("gloo", torch.device("cpu"))
        yield init_mesh(spec, device=dev)
        return
    world = world_from_env()
    check_world(spec, world)
    if world is None:  # one plain process: no process group, and any device the single-process trainer takes
        from ..trainer.loop import resolve_device

        yield Mesh.single(resolve_device(device))
        return
    missing = [name for name in TORCHRUN_ENV if name not in os.environ]
    if missing:
        raise InputError(f"WORLD_SIZE is set but {', '.join(missing)} are not: start the processes with "
                         f"`{launch_hint(world)}`, which sets them all")
    backend, dev = backend_and_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend, timeout=_timeout(timeout_s),
                            **({"device_id": dev} if dev.type == "cuda" else {}))
    owned = True
    try:
        yield init_mesh(spec, device=dev)
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()
