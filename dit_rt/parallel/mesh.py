"""Parallel degrees, their validation, and the one device mesh they are laid out on.

The mesh dims are ordered (dp, cfg, ring, ulysses), outermost first, so the Ulysses group (an all-to-all
of every attention input, the heaviest traffic) holds consecutive ranks, which torchrun places on one
host, and Ring (point-to-point K/V passing that overlaps with compute) may span hosts.
The sequence-parallel group is ring x ulysses flattened: sequence shard index = ring_rank * ulysses +
ulysses_rank, which makes each Ring chunk, after the Ulysses all-to-all, a contiguous run of tokens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

DEGREES = ("dp", "cfg", "ring", "ulysses")  # mesh dim order, outermost first


@dataclass(frozen=True)
class ParallelConfig:
    """Degrees of each parallel mode; their product is the world size.

    dp: data parallel (the prompt batch split across groups). cfg: 1 or 2, the conditional and
    unconditional passes on different ranks. ulysses / ring: sequence parallel inside attention
    (all-to-all over heads / K/V passed around a ring); both > 1 is the hybrid. fsdp: shard the
    transformer blocks' weights over all ranks with FSDP2.
    """

    dp: int = 1
    cfg: int = 1
    ulysses: int = 1
    ring: int = 1
    fsdp: bool = False

    def __post_init__(self):
        for name in DEGREES:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"parallel {name}={value!r}: a degree is an integer >= 1")
        if self.cfg not in (1, 2):
            raise ValueError(
                f"parallel cfg={self.cfg}: CFG parallel runs the conditional and unconditional passes on "
                "different ranks, so cfg is 1 or 2"
            )
        if not isinstance(self.fsdp, bool):
            raise ValueError(f"parallel fsdp={self.fsdp!r}: expected True or False")

    @property
    def sp(self) -> int:
        """Sequence-parallel degree: the number of ranks one sequence is split over."""
        return self.ulysses * self.ring

    @property
    def world_size(self) -> int:
        return self.dp * self.cfg * self.ulysses * self.ring

    @classmethod
    def from_dict(cls, options: dict | None, world_size: int) -> ParallelConfig:
        """Read `parallel=dict(dp=, cfg=, ulysses=, ring=, fsdp=)` (missing degrees are 1) and check it
        against the world size. Errors name the fix."""
        options = dict(options or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"parallel: unknown key(s) {unknown}; valid keys: {sorted(known)}")
        config = cls(**options)
        if config.world_size != world_size:
            product = " x ".join(f"{n}={getattr(config, n)}" for n in DEGREES)
            raise ValueError(
                f"parallel degrees {product} need {config.world_size} processes but the world size is "
                f"{world_size}; launch with `torchrun --nproc-per-node {config.world_size} ...` (or "
                f"`python tools/launch.py ...`), or change the degrees so their product is {world_size}"
            )
        return config


def init_distributed(device: torch.device | str | None = None) -> tuple[int, int]:
    """Initialise the default process group if a launcher (torchrun) started us and nobody has yet.

    NCCL for CUDA devices, gloo otherwise. Under torchrun each process takes cuda:LOCAL_RANK.
    Returns (rank, world_size); (0, 1) when there is no launcher and no group.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return 0, 1
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


@dataclass(frozen=True)
class ParallelMesh:
    """The device mesh of a ParallelConfig and this rank's coordinates in it.

    Groups are None when their degree is 1 (nothing to communicate) or without a process group.
    """

    config: ParallelConfig
    mesh: DeviceMesh | None = None
    sp_mesh: DeviceMesh | None = None  # ring x ulysses flattened (torch wants flattened meshes kept apart)
    # cfg x ring x ulysses flattened: the ranks that share one data-parallel slice of the batch (they
    # split its VAE decode spatially).
    replica_mesh: DeviceMesh | None = None

    @classmethod
    def build(
        cls, config: ParallelConfig | dict | None = None, device: torch.device | str | None = None
    ) -> ParallelMesh:
        """Initialise the process group if needed and lay `config` out on one DeviceMesh."""
        _, world = init_distributed(device)
        if not isinstance(config, ParallelConfig):
            config = ParallelConfig.from_dict(config, world)
        elif config.world_size != world:
            config = ParallelConfig.from_dict(vars(config), world)  # raises the world-size error
        if world == 1 and not dist.is_initialized():
            return cls(config)
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
        mesh = init_device_mesh(
            device_type, tuple(getattr(config, n) for n in DEGREES), mesh_dim_names=DEGREES
        )
        sp_mesh = mesh["ring", "ulysses"]._flatten("sp") if config.sp > 1 else None
        replica = mesh["cfg", "ring", "ulysses"]._flatten("replica") if config.cfg * config.sp > 1 else None
        return cls(config, mesh, sp_mesh, replica)

    def size(self, dim: str) -> int:
        """Ranks along `dim`: a mesh dim, "sp" (ring x ulysses) or "replica" (cfg x ring x ulysses)."""
        if dim == "sp":
            return self.config.sp
        if dim == "replica":
            return self.config.cfg * self.config.sp
        return getattr(self.config, dim)

    def _sub(self, dim: str) -> DeviceMesh:
        if dim in ("sp", "replica"):
            return self.sp_mesh if dim == "sp" else self.replica_mesh
        return self.mesh[dim]

    def rank(self, dim: str) -> int:
        if self.mesh is None or self.size(dim) == 1:
            return 0
        return self._sub(dim).get_local_rank()

    def group(self, dim: str) -> dist.ProcessGroup | None:
        if self.mesh is None or self.size(dim) == 1:
            return None
        return self._sub(dim).get_group()
