"""FSDP2 for inference: each transformer block's weights sharded over all ranks, gathered just in time.

Every rank runs the same weights whatever its dp / cfg / sequence coordinates, so the shards span the
whole world: a 14B transformer takes 1/world of its bytes per GPU plus one or two gathered blocks.
fully_shard per block of every declared stack (`dit_rt.contract`; then on the root for the remaining
boundary layers) lets the all-gather of block i+1 overlap block i.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


def world_mesh() -> DeviceMesh:
    """A 1-D mesh over every rank, the one FSDP shards over (build it once, share it between models)."""
    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device_type, (dist.get_world_size(),), mesh_dim_names=("fsdp",))


def shard_blocks(
    model: nn.Module,
    blocks: str | tuple[str, ...] | None = None,
    *,
    reshard_after_forward: bool = True,
    mesh: DeviceMesh | None = None,
) -> nn.Module:
    """Apply `torch.distributed.fsdp.fully_shard` to each module of `model.<blocks>` and to `model`.

    blocks: the ModuleList path(s) (dotted: "encoder.block" for T5 encoders); None: the model's declared
    stacks (`stacks`, dit_rt.contract), else "blocks".

    Needs an initialised process group (see `init_distributed`); the parameters must be materialised
    (not meta), on this rank's device or on the host: fully_shard moves each block to the mesh's device
    as it shards it, so a model loaded into host memory never sits on the GPU whole.
    reshard_after_forward=False keeps gathered weights between steps (faster, more memory). mesh: the
    1-D world mesh (`world_mesh()`); built when None. Returns the model,
    whose modules are now FSDP modules in place.
    """
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        raise RuntimeError("shard_blocks needs torch.distributed; launch with torchrun (tools/launch.py)")
    mesh = mesh if mesh is not None else world_mesh()
    if blocks is None:
        blocks = tuple(s.blocks for s in getattr(model, "stacks", ())) or "blocks"
    stacks = []
    for path in (blocks,) if isinstance(blocks, str) else blocks:
        try:
            stack = model.get_submodule(path)
        except AttributeError:
            stack = None
        if not isinstance(stack, nn.ModuleList):
            raise ValueError(f"shard_blocks: {type(model).__name__}.{path} is not a ModuleList of blocks")
        stacks.append(stack)
    for block in (b for stack in stacks for b in stack):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model
