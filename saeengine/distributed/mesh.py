"""A 2-D mesh of ranks, data axis x latent axis, over torch.distributed (gloo on CPUs, NCCL
on GPUs), and the contiguous latent slice each latent rank owns.

Rank layout: ``rank = data_rank * latent_size + latent_rank``, so a latent group (the
ranks that share one batch and split the dictionary) is a run of consecutive ranks: on
GPUs, one node's NVLink carries the latent axis's per-step traffic, and the data axis
(gradient all-reduces only) may cross nodes.

Groups are plain ``torch.distributed.new_group`` calls, one per row and per column, made
by every rank in the same order (new_group's contract). DeviceMesh would give the same
groups; explicit groups keep the hot path on plain collectives over local tensors
and work the same on gloo.

Uneven widths: F need not divide by the latent axis; :func:`latent_slice` gives the first
F mod P ranks one latent more (the rule of ``torch.tensor_split``), so slices differ by
at most one row.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import ConfigError, InputError
from . import comm

AXES = ("data", "latent")


@dataclass(frozen=True)
class MeshSpec:
    """The mesh's shape: ``data`` replicas x ``latent`` slices."""

    data: int = 1
    latent: int = 1

    def __post_init__(self):
        for axis in AXES:
            value = getattr(self, axis)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"mesh {axis}={value!r}: each axis needs a whole number >= 1 of ranks "
                                 "(e.g. --mesh data=2,latent=2)")

    @property
    def world_size(self) -> int:
        return self.data * self.latent

    def __str__(self) -> str:
        return f"data={self.data},latent={self.latent}"


def parse_mesh(text: str) -> MeshSpec:
    """``"data=2,latent=2"`` (either key may be left out: 1; order free) -> MeshSpec."""
    if isinstance(text, MeshSpec):
        return text
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"--mesh {text!r}: write the axes as data=D,latent=L (e.g. --mesh data=2,latent=2)")
    sizes: dict[str, int] = {}
    for part in text.split(","):
        match = re.fullmatch(r"\s*([a-z_]+)\s*=\s*(\d+)\s*", part)
        if not match:
            raise InputError(f"--mesh {text!r}: cannot read {part!r}; write the axes as data=D,latent=L "
                             "(e.g. --mesh data=2,latent=2)")
        name, value = match.group(1), int(match.group(2))
        if name not in AXES:
            raise InputError(f"--mesh {text!r}: unknown axis {name!r}; the axes are {', '.join(AXES)}")
        if name in sizes:
            raise InputError(f"--mesh {text!r}: axis {name!r} is given twice; give each axis once")
        sizes[name] = value
    return MeshSpec(**sizes)


def latent_slice(f: int, latent_rank: int, latent_size: int) -> tuple[int, int]:
    """The latents [lo, hi) that latent rank ``latent_rank`` of ``latent_size`` owns out
    of ``f``: contiguous, the first ``f % latent_size`` ranks one latent more."""
    if not 0 <= latent_rank < latent_size:
        raise InputError(f"latent_rank={latent_rank} must lie in [0, latent_size={latent_size})")
    if f < latent_size:
        raise InputError(f"d_sae={f} latents cannot be split over {latent_size} latent ranks (each needs at least "
                         f"one); use a latent axis of at most {f}")
    base, extra = divmod(f, latent_size)
    lo = latent_rank * base + min(latent_rank, extra)
    return lo, lo + base + (1 if latent_rank < extra else 0)


def latent_slices(f: int, latent_size: int) -> list[tuple[int, int]]:
    """Every latent rank's :func:`latent_slice`, in rank order."""
    return [latent_slice(f, r, latent_size) for r in range(latent_size)]


@dataclass
class Mesh:
    """This rank's place in the mesh and the groups of its two axes.

    data_group: the ranks holding the same latent slice (one per data replica);
        None when the data axis has size 1. Gradients are summed over it.
    latent_group: the ranks sharing this rank's batch, one per latent slice; None when
        the latent axis has size 1. The top-k candidates and partial reconstructions
        travel over it.
    """

    spec: MeshSpec
    rank: int
    data_rank: int
    latent_rank: int
    data_group: Any = None
    latent_group: Any = None
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def world_size(self) -> int:
        return self.spec.world_size

    @property
    def data_size(self) -> int:
        return self.spec.data

    @property
    def latent_size(self) -> int:
        return self.spec.latent

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def latent_slice(self, f: int) -> tuple[int, int]:
        return latent_slice(f, self.latent_rank, self.latent_size)

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> "Mesh":
        """A 1 x 1 mesh without torch.distributed: every collective is a no-op."""
        return cls(MeshSpec(1, 1), 0, 0, 0, device=torch.device(device))

    def __str__(self) -> str:
        return (f"rank {self.rank}/{self.world_size} of mesh {self.spec} "
                f"(data_rank {self.data_rank}, latent_rank {self.latent_rank})")


def _default_device(backend: str) -> torch.device:
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank() % max(torch.cuda.device_count(), 1)))
        return torch.device("cuda", local)
    return torch.device("cpu")


def init_mesh(spec: MeshSpec | str, *, backend: str | None = None, device: torch.device | str | None = None,
              init: bool = True) -> Mesh:
    """This rank's :class:`Mesh`.

    torch.distributed must be initialized, or ``init`` (default) initializes it from the
    environment ``torchrun`` sets (``backend``: "nccl" when CUDA is available, else
    "gloo"). The world size must equal data x latent; every rank must call this (it
    creates the groups collectively).
    """
    spec = parse_mesh(spec)
    if not dist.is_initialized():
        if spec.world_size == 1 and "WORLD_SIZE" not in os.environ:
            return Mesh.single(device or "cpu")
        if not init or "WORLD_SIZE" not in os.environ:
            raise InputError(f"mesh {spec} needs {spec.world_size} processes under torch.distributed; launch with "
                             f"torchrun --nproc-per-node {spec.world_size} (or call "
                             "torch.distributed.init_process_group first)")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend)
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != spec.world_size:
        raise InputError(f"mesh {spec} needs data x latent = {spec.data} x {spec.latent} = {spec.world_size} "
                         f"processes, but the world has {world}; launch {spec.world_size} processes "
                         f"(torchrun --nproc-per-node {spec.world_size}) or choose a mesh whose product is {world}")
    backend = dist.get_backend()
    data_rank, latent_rank = divmod(rank, spec.latent)
    latent_group = data_group = None
    # new_group is collective: every rank creates every group, in the same order.
    for row in range(spec.data):
        ranks = [row * spec.latent + c for c in range(spec.latent)]
        group = dist.new_group(ranks) if spec.latent > 1 else None
        if row == data_rank:
            latent_group = group
    for col in range(spec.latent):
        ranks = [r * spec.latent + col for r in range(spec.data)]
        group = dist.new_group(ranks) if spec.data > 1 else None
        if col == latent_rank:
            data_group = group
    dev = torch.device(device) if device is not None else _default_device(backend)
    return Mesh(spec, rank, data_rank, latent_rank, data_group, latent_group, dev, backend)


def config_fields(cfg) -> dict[str, Any]:
    """A dataclass config -> {field: JSON-able value} (what :func:`check_same_config` compares)."""
    from dataclasses import fields, is_dataclass

    if is_dataclass(cfg):
        return {f.name: _plain(getattr(cfg, f.name)) for f in fields(cfg)}
    return {str(key): _plain(value) for key, value in dict(cfg).items()}


def _plain(value):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return repr(value)


def config_hash(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=repr).encode()).hexdigest()


def check_same_config(mesh: Mesh, cfg, what: str = "config") -> None:
    """Every rank of the world must run the same ``cfg`` (a dataclass or a dict): one
    all_gather of (hash, fields) at start. A ConfigError names each differing field, its
    values and the ranks holding each value, on every rank (so none is left waiting)."""
    if not mesh.distributed:
        return
    fields = config_fields(cfg)
    gathered = comm.all_gather_object((config_hash(fields), fields), None, axis="world", what="config_check")
    if len({h for h, _ in gathered}) == 1:
        return
    names = sorted({name for _, f in gathered for name in f})
    problems = []
    for name in names:
        by_value: dict[str, list[int]] = {}
        for rank, (_, f) in enumerate(gathered):
            by_value.setdefault(json.dumps(f.get(name, "<missing>"), sort_keys=True, default=repr), []).append(rank)
        if len(by_value) > 1:
            problems.append(f"{name}: " + "; ".join(f"{value} on rank{'s' if len(r) > 1 else ''} "
                                                    f"{','.join(map(str, r))}" for value, r in by_value.items()))
    raise ConfigError(f"the ranks run different {what}s ({' | '.join(problems)}); start every rank with the same "
                      f"settings (one command line under torchrun)")
