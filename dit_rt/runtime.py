"""Runtime options of `dit_rt.load`, validated up front, and how they are applied to built models."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dit_rt.parallel.mesh import ParallelConfig, ParallelMesh

DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


AUTO_RESIDENT = -1  # offload_resident: as many leading blocks as the card holds (resident_gib="auto")


def parse_offload(offload) -> tuple[str | None, int]:
    """offload= as (mode, resident bytes): "block" / "model" / None, or dict(name="block", resident_gib=G),
    which keeps the leading blocks that fit G GiB on the device for good and streams the rest;
    resident_gib="auto" keeps as many as the card's free memory holds (AUTO_RESIDENT, resolved by the
    memory check before loading)."""
    from dit_rt.offload import OFFLOAD_MODES

    resident = 0
    if isinstance(offload, dict):
        extra = set(offload) - {"name", "resident_gib"}
        if offload.get("name") != "block" or extra:
            raise ValueError(
                f"offload={offload!r}: a dict takes name='block' and resident_gib= (GiB of blocks kept on "
                "the GPU, or 'auto'), e.g. dict(name='block', resident_gib=24)"
            )
        gib = offload.get("resident_gib", 0)
        if gib == "auto":
            return "block", AUTO_RESIDENT
        if isinstance(gib, bool) or not isinstance(gib, (int, float)) or not 0 <= gib < 2**20:
            raise ValueError(f"offload resident_gib={gib!r} must be a number of GiB >= 0, or 'auto'")
        offload, resident = "block", int(gib * 2**30)
    if offload not in (None, *OFFLOAD_MODES):
        raise ValueError(f"offload={offload!r} is unknown; choose one of: {', '.join(OFFLOAD_MODES)}")
    return offload, resident


def _dtype(value, name: str) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        if value is not None and value not in DTYPES.values():
            raise ValueError(
                f"{name}={value} is not supported; use one of torch.bfloat16, torch.float16, torch.float32"
            )
        return value
    if isinstance(value, str) and value in DTYPES:
        return DTYPES[value]
    raise ValueError(f"{name}={value!r} is not supported; use one of {', '.join(DTYPES)}")


@dataclass
class RuntimeOptions:
    device: torch.device
    dtype: torch.dtype
    attention: str = "auto"
    linear: str = "default"
    vae_dtype: torch.dtype | None = None
    park_experts: bool | None = None
    parallel: ParallelConfig | None = None
    cache: dict | None = None
    offload: str | None = None
    compile: bool = False
    cuda_graphs: bool = False
    # Built from `parallel`: the device mesh, and what `install` applied to each model (kept for remove()).
    mesh: ParallelMesh = field(default_factory=lambda: ParallelMesh(ParallelConfig()))
    installed: list = field(default_factory=list)
    fsdp_mesh: object | None = None  # the 1-D world DeviceMesh FSDP shards over, shared by all models
    attention_options: dict = field(default_factory=dict)  # an attention mode's options (`svg`)
    offload_resident: int = 0  # offload="block": bytes of leading blocks kept on the device (resident_gib=)

    @classmethod
    def create(
        cls,
        *,
        device=None,
        dtype=None,
        attention="auto",
        linear="default",
        vae_dtype=None,
        park_experts=None,
        parallel=None,
        cache=None,
        offload=None,
        compile=False,
        cuda_graphs=False,
    ) -> RuntimeOptions:
        """Check every option before anything heavy happens; errors name the valid choices.

        parallel: None (one process), or dict(dp=, cfg=, ulysses=, ring=, fsdp=) under torchrun, whose
        degrees must multiply to the world size. The process group is initialised here when the launcher
        has not (NCCL on CUDA, gloo on CPU); on CUDA each process then runs on cuda:LOCAL_RANK.
        attention: a backend name, "auto", or an attention mode as a name or dict(name=..., **options), e.g.
        dict(name="svg", budget=0.25); a mode's options are checked here and its dense kernel like a name.
        """
        from dit_rt.ops.attention import (
            attention_mode,
            attention_names,
            attention_spec,
            available_attention,
            unusable_reason,
        )
        from dit_rt.ops.linear import LINEAR_FORMATS
        from dit_rt.parallel.mesh import init_distributed

        device = torch.device(
            device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        )
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked for but no CUDA device is visible; pass device='cpu'")
        if parallel is not None and not isinstance(parallel, (dict, ParallelConfig)):
            raise ValueError(
                "parallel must be a dict such as dict(cfg=2, ulysses=2) or None, got "
                f"{type(parallel).__name__}"
            )
        dtype = _dtype(dtype, "dtype") or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        vae_dtype = _dtype(vae_dtype, "vae_dtype")
        names = attention_names()
        if isinstance(attention, dict) and attention.get("name") not in names:
            raise ValueError(f"attention={attention!r}: name= must be one of: {', '.join(names)}")
        if not isinstance(attention, (str, dict)) or isinstance(attention, str) and attention not in names:
            raise ValueError(f"attention={attention!r} is unknown; choose one of: {', '.join(names)}")
        attention, attention_options = attention_spec(attention)
        mode = attention_mode(attention)
        kernel = mode.parse(attention_options).dense if mode is not None else attention
        if kernel != "auto":  # a named backend that cannot run here fails now, not after the weights load
            if kernel not in names or attention_mode(kernel) is not None:
                raise ValueError(f"attention={attention!r}: dense={kernel!r} is not an attention backend")
            reason = unusable_reason(kernel, device=device, dtype=dtype)
            if reason is not None:
                usable = ", ".join(["auto", *available_attention(device, dtype)])
                raise ValueError(
                    f"attention={kernel!r} cannot run with device={device}, "
                    f"dtype={str(dtype).removeprefix('torch.')}: {reason}; usable there: {usable}"
                )
        ring = (vars(parallel) if isinstance(parallel, ParallelConfig) else parallel or {}).get("ring") or 1
        if mode is not None and not mode.ring and ring > 1:
            raise ValueError(
                f"attention={attention!r} does not run under Ring attention (ring={ring} splits the video "
                "tokens over ranks, so a rank would see some frames only); use ulysses= instead"
            )
        if mode is not None and cuda_graphs:
            raise ValueError(
                f"attention={attention!r} switches between dense and sparse attention by step, which a CUDA "
                "graph replay cannot follow; drop cuda_graphs"
            )
        if linear not in LINEAR_FORMATS:
            raise ValueError(f"linear={linear!r} is unknown; choose one of: {', '.join(LINEAR_FORMATS)}")
        if linear != "default" and dtype == torch.float32 and device.type == "cuda":
            raise ValueError(f"linear={linear!r} quantizes bf16/fp16 models; pass dtype=torch.bfloat16")
        from dit_rt.cache import check_cache

        check_cache(cache)
        offload, offload_resident = parse_offload(offload)
        if compile not in (True, False):
            raise ValueError(f"compile must be True or False, got {compile!r}")
        if cuda_graphs not in (True, False):
            raise ValueError(f"cuda_graphs must be True or False, got {cuda_graphs!r}")
        fsdp = (vars(parallel) if isinstance(parallel, ParallelConfig) else parallel or {}).get("fsdp")
        if cuda_graphs and fsdp:
            # FSDP frees each block's gathered weights after it runs and gathers them anew at the next
            # forward, on its own streams: a replay would read freed memory.
            raise ValueError(
                "cuda_graphs=True cannot be combined with parallel fsdp=True (FSDP re-gathers the weights "
                "into new memory at every forward, which a graph replay cannot follow); drop one of them"
            )
        if cuda_graphs and device.type != "cuda":
            raise ValueError(
                f"cuda_graphs=True needs device='cuda' (got device='{device}'); drop cuda_graphs"
            )
        if cuda_graphs and offload:
            # Graphs replay fixed weight addresses; offload moves the weights at every block or every use.
            raise ValueError(
                f"cuda_graphs=True cannot be combined with offload={offload!r}; drop one of them"
            )
        if parallel and offload:
            # Offload streams whole weights through the GPU that FSDP would shard; not proven together.
            raise ValueError(f"offload={offload!r} cannot be combined with parallel=; drop one of them")
        if offload and park_experts:
            raise ValueError(
                "park_experts=True and offload= both move weights to the host; use offload= alone"
            )
        if park_experts not in (None, True, False):
            raise ValueError(
                f"park_experts must be None (decide by free memory), True or False, got {park_experts!r}"
            )
        mesh = ParallelMesh(ParallelConfig())
        if parallel is not None:
            # Validate the degrees (and their product against the world) before the mesh's collectives.
            options = vars(parallel) if isinstance(parallel, ParallelConfig) else parallel
            _, world = init_distributed(device)
            parallel = ParallelConfig.from_dict(options, world)
            if device.type == "cuda" and world > 1:
                device = torch.device("cuda", torch.cuda.current_device())  # cuda:LOCAL_RANK
            if parallel.fsdp and park_experts:
                raise ValueError("park_experts=True moves whole experts to the CPU; FSDP shards them instead")
            mesh = ParallelMesh.build(parallel, device)
        return cls(
            device,
            dtype,
            attention,
            linear,
            vae_dtype,
            park_experts,
            parallel,
            cache,
            offload,
            compile,
            cuda_graphs,
            mesh,
            attention_options=attention_options,
            offload_resident=offload_resident,
        )

    @property
    def linear_format(self) -> str | None:
        return None if self.linear == "default" else self.linear

    def install(self, model: torch.nn.Module, alias: str | None = None) -> None:
        """Apply the runtime options to a built transformer, in this order: the attention backend
        (resolved once, logged once); sequence parallelism per the model's `sequence_plan` (Ulysses / Ring
        ops wrapping that backend) when ulysses x ring > 1; FSDP2 over every rank's blocks when fsdp;
        per-block torch.compile; CUDA graphs of the block stack; block offload; the step cache (`alias`
        picks TeaCache's published coefficients), whose skip decision is all-reduced over the sequence
        group."""
        from dit_rt.ops.attention import set_attention
        from dit_rt.parallel import SequenceParallel

        set_attention(
            model, dict(name=self.attention, **self.attention_options), device=self.device, dtype=self.dtype
        )
        if self.mesh.size("sp") > 1:
            self.installed.append(SequenceParallel.apply(model, self.mesh))
        if self.parallel is not None and self.parallel.fsdp:
            self.shard(model)
        if self.compile:
            from dit_rt.compile import apply_compile

            apply_compile(model)
        if self.cuda_graphs:
            from dit_rt.graphs import apply_cuda_graphs

            apply_cuda_graphs(model)
        if self.offload == "block":
            from dit_rt.offload import apply_offload

            apply_offload(model, "block", device=self.device, resident_bytes=self.offload_resident)
        if self.cache:
            from dit_rt.cache import apply_cache

            cache = apply_cache(model, self.cache, alias=alias)
            group = self.mesh.group("sp")
            if group is not None:  # every rank of a sequence group must take the same skip decision
                import torch.distributed as dist

                def reduce(sums: torch.Tensor) -> torch.Tensor:
                    dist.all_reduce(sums, group=group)
                    return sums

                cache.reduce = reduce

    def shard(self, model: torch.nn.Module, blocks: str | None = None) -> None:
        """FSDP2 over all ranks: each block of `model.<blocks>` (None: of the model's declared stacks),
        then the rest (a no-op in one process)."""
        from dit_rt.parallel import shard_blocks
        from dit_rt.parallel.fsdp import world_mesh

        if self.mesh.mesh is None:
            return
        if self.fsdp_mesh is None:
            self.fsdp_mesh = world_mesh()
        shard_blocks(model, blocks, mesh=self.fsdp_mesh)

    @property
    def rank(self) -> int:
        """This process's global rank (0 without a process group)."""
        import torch.distributed as dist

        return dist.get_rank() if dist.is_initialized() else 0
