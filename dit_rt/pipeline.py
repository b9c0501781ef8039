"""The shared denoising loop and what every pipeline shares: the pipeline registry, the request and output
containers, seeded noise, the guidance formulas, step-loop progress.

A family pipeline (dit_rt/pipelines/<family>.py) subclasses `Pipeline`, registers itself by the Hub
`_class_name` of model_index.json with `@register_pipeline(...)`, and provides only what differs between
families (see `Pipeline`). `Pipeline.denoise` owns the rest: data parallel split and gather, the seeded
initial noise, CFG and CFG parallel, step-cache steps and branches, expert switching (offload and parked
experts), progress, callback, decode and output.

Under torchrun with `parallel=` (see dit_rt.parallel) the same loop runs on every rank: data parallel splits
the prompt batch over the dp groups (the noise is drawn for the whole batch on every rank, then sliced, so
each item sees the noise it would in one process); CFG parallel runs the conditional pass on cfg rank 0 and
the unconditional one on rank 1 and exchanges the predictions; Ulysses / Ring run inside the transformer's
attention (installed by RuntimeOptions). Every rank then steps the scheduler identically, the ranks of a
dp group decode their items together, and every rank returns the whole batch.
"""

from __future__ import annotations

import importlib
import pkgutil
import time
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from dit_rt import checks, memory


class _PhaseClock:
    """Wall seconds between laps, the device synchronized at each (the work a phase queued is its own)."""

    def __init__(self, device: torch.device):
        self.device, self.laps, self.t = device, {}, time.perf_counter()

    def lap(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.laps[name], self.t = now - self.t, now


@dataclass
class GenerationOutput:
    """What `generate` returns.

    frames:   float32 (B, T, H, W, C) in [0, 1] on the CPU; T == 1 for image models. Empty (0 elements)
              when generated with output_type="latents".
    latents:  the final denoised latents, before the VAE, in the reference pipeline's latent layout.
    stats:    counters such as transformer evaluations computed / skipped by a step cache.
    seed:     the seed the initial noise was drawn from (drawn at random when none was given), or None when
              the caller passed `latents`.
    metadata: what produced the output (prompt, seed, model, sizes, steps, guidance, runtime options);
              `save` writes it into the file.
    timings:  seconds of each phase, the device synchronized at their ends: "text" (prompt encoding),
              "steps" (the denoising loop, latent preparation included), "decode" (VAE, frames to the host).
    """

    frames: torch.Tensor
    latents: torch.Tensor
    fps: int = 16
    stats: dict = field(default_factory=dict)
    seed: int | None = None
    metadata: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)

    def save(
        self, path: str | Path, *, index: int = 0, fps: int | None = None, metadata: dict | None = None
    ) -> list[Path]:
        """Write batch item `index` to `path` (.mp4 / .gif / .png / .webp by extension); returns the files.

        fps: None uses the model's frame rate. metadata: None writes `self.metadata` (batch lists narrowed to
        item `index`); {} writes none.
        """
        from dit_rt import media

        if self.frames.numel() == 0:
            raise ValueError(
                "this output holds latents only (output_type='latents'): decode them with "
                "pipe.decode(out.latents) and save the frames with dit_rt.media.save, or generate with "
                "output_type='frames'"
            )
        if not 0 <= index < len(self.frames):
            raise IndexError(f"index {index} is outside the batch of {len(self.frames)}")
        if metadata is None:
            metadata = {
                k: v[index] if isinstance(v, list) and len(v) == len(self.frames) else v
                for k, v in self.metadata.items()
            }
        return media.save(self.frames[index], path, fps=self.fps if fps is None else fps, metadata=metadata)


def as_prompt_list(prompt, name: str = "prompt") -> list[str]:
    """A str or a list of str -> list of str; anything else is a clear error."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise TypeError(f"{name} must be a string or a non-empty list of strings, got {type(prompt).__name__}")


def matched(value, prompts: list[str], name: str, plural: str | None = None) -> list[str]:
    """A second prompt list (negatives, a second encoder's prompts) matched to `prompts`: one string is
    repeated over the batch; a list must have one entry per prompt."""
    values = as_prompt_list(value, name)
    if len(values) == 1:
        values = values * len(prompts)
    if len(values) != len(prompts):
        raise ValueError(f"{len(values)} {plural or name + 's'} for {len(prompts)} prompts")
    return values


class Resolved(NamedTuple):
    """generate()'s size, frames, steps and guidance with the model's defaults applied."""

    height: int
    width: int
    num_frames: int
    steps: int
    guidance: float


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A generator on `device`; the same seed gives the same noise on the same device."""
    if seed is not None and not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def guide(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance as Wan and FLUX apply it: uncond + s * (cond - uncond)."""
    return uncond + scale * (cond - uncond)


def guide_from_cond(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance as Cosmos applies it (on x0): cond + s * (cond - uncond), weight 1 + s."""
    return cond + scale * (cond - uncond)


GUIDANCE: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "from_uncond": guide,  # Wan, FLUX (true CFG)
    "from_cond": guide_from_cond,  # Cosmos
}
"""The guidance formulas by name: a family pipeline names its own in `Pipeline.guidance`."""


def progress(steps: Iterable, enabled: bool, desc: str = "denoising") -> Iterable:
    if not enabled:
        return steps
    from tqdm.auto import tqdm

    return tqdm(steps, desc=desc, leave=False)


StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]
"""callback(step_index, timestep, latents) called after each denoising step."""


# ---------------------------------------------------------------------------------------------- registry

_PIPELINES: dict[str, type] = {}


def register_pipeline(*class_names: str):
    """Class decorator: the pipeline runs checkpoints whose model_index.json `_class_name` is one of these."""

    def register(cls: type) -> type:
        for name in class_names:
            if _PIPELINES.get(name, cls) is not cls:
                raise ValueError(
                    f"pipeline {name!r} is registered twice ({_PIPELINES[name].__name__}, {cls})"
                )
            _PIPELINES[name] = cls
        return cls

    return register


def _import_families() -> None:
    """Import every module of dit_rt.pipelines once, so that their `register_pipeline` decorators run.
    Done on the first look-up, not at `import dit_rt`: a family module may import its models."""
    import dit_rt.pipelines as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")


def find_pipeline(class_name: str | None) -> type | None:
    """The pipeline class registered for a model_index.json `_class_name`, or None if dit_rt has none."""
    if class_name not in _PIPELINES:
        _import_families()
    return _PIPELINES.get(class_name)


def pipeline_names() -> list[str]:
    """Every registered `_class_name`, sorted."""
    _import_families()
    return sorted(_PIPELINES)


# ---------------------------------------------------------------------------------------------- the loop


@dataclass
class Request:
    """One generate() call after the family pipeline has applied its defaults and checked it.

    prompts / negatives: the whole batch; negatives None runs no unconditional pass.
    shape:     the whole batch's initial-noise shape (the reference pipeline's latent shape).
    guidance:  the guidance scale of each expert; CFG runs when negatives are given and guidance[0] > 1
               (as the references: the first expert's scale decides).
    encode:    keyword arguments of `encode_prompt` (max_sequence_length, ...).
    extra:     what only the family reads (image, sizes, scheduler options, ...).
    """

    prompts: list[str]
    negatives: list[str] | None
    shape: tuple[int, ...]
    steps: int
    guidance: tuple[float, ...]
    metadata: dict
    latents: torch.Tensor | None = None
    seed: int | None = None
    encode: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    fps: int = 16
    output_type: str = "frames"
    progress_bar: bool = True
    callback: StepCallback | None = None

    @property
    def do_cfg(self) -> bool:
        return self.negatives is not None and self.guidance[0] > 1.0


@dataclass
class Conditioning:
    """What one guidance branch's `predict` sees: its prompt encoding and what both branches share."""

    prompt: Any  # encode_prompt's output for this branch's prompts (this dp group's part)
    shared: Any = None  # prepare_latents' conditioning of both branches (image latents and tokens) or None


class Pipeline:
    """Base of the family pipelines: `denoise` is the shared loop; a family provides the hooks below.

    Attributes a family sets: `options` (RuntimeOptions), `mesh`, `device`, `dtype`, `transformers` (the
    denoisers, one per expert), `offload` (ComponentOffload), `park_experts` (whether the inactive expert
    waits in host memory).

    Hooks (each family's own):
      check_inputs(...)                      before heavy work; the family's generate() calls it
      encode_prompt(prompts, **encode)       -> a branch's prompt conditioning
      prepare_latents(latents, request)      this dp group's noise (float32) -> (loop latents, shared cond)
      make_scheduler(request)                -> a scheduler with `.timesteps` and `.step(pred, i, latents)`
                                                (i: the step's index in `.timesteps`)
      predict(model, x, t, cond)             -> what guidance combines (velocity for Wan, x0 for Cosmos);
                                                t is the step's timestep on the device: schedule lookups
                                                take `self.schedule_index(t)` (no device sync in the loop)
      decode_latents(latents)                -> float32 frames (B, T, H, W, C) in [0, 1] on the device
      expert_index(t)                        -> which of `transformers` runs at timestep t (a host tensor;
                                                default 0)
    and `guidance`, the name of its formula in GUIDANCE.

    What every family's __init__ and generate() do the same way is here too: `start`, `build_text_encoder`,
    `build_vae`, `build_transformer`, `offload_components`; `prompt_list`, `resolve` (defaults and their
    checks), `metadata`, `t5_embeddings`, `vae_frames` and `decode_sized`.
    """

    guidance = "from_uncond"
    park_experts = False
    # Components whose block linears take linear= and whose blocks stream under offload="block" (the memory
    # check before loading reads them; FLUX.2 adds its text encoder to both).
    quantized_components: tuple[str, ...] = ("transformer", "transformer_2")
    streamed_components: tuple[str, ...] = ("transformer", "transformer_2")
    metadata_notes: dict = {}  # recorded after the options in every output (Cosmos: no guardrail ran)
    auto_margin: int = memory.AUTO_MARGIN  # resident_gib="auto": room for activations beyond RESERVE
    vae_default_dtype: torch.dtype | None = None  # the VAE's dtype without vae_dtype= (None: the model dtype)
    step_index: int | None = None  # the denoising loop's current step (None outside the loop)

    def schedule_index(self, t: torch.Tensor) -> int | torch.Tensor:
        """What a scheduler lookup of timestep t takes: inside the loop the step's index (a lookup by a
        device tensor's value would synchronize the device every step), else t itself."""
        return t if self.step_index is None else self.step_index

    def on_device(self, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A host scalar (a scheduler's sigma) as a 0-dim tensor on the device, written by a fill kernel: a
        copy from pageable host memory would synchronize the device."""
        return torch.full((), x.item(), device=self.device, dtype=dtype)

    def start(self, folder, index: dict, options, entry=None) -> Callable[..., torch.nn.Module]:
        """Set what every family sets first (`folder`, `options`, `entry`, `mesh`, `device`, `dtype`, `fsdp`
        and the placements `host` and `sharded`) and return `build(component, dtype, linear_format=None, *,
        to=host)`, which builds a component by its diffusers class name (dit_rt.components).

        host: the device, or host memory with offload= (components then visit the device only while used).
        sharded: host memory under FSDP (transformers and text encoders move to the GPU block by block as they
        are sharded: a model larger than one GPU never sits on one whole), else `host`.
        """
        from dit_rt import loaders
        from dit_rt.components import build_component

        memory.check_fits(  # before any weight is read: a clear error naming what would fit
            folder,
            loaders.pipeline_components(index),
            options,
            name=entry.alias if entry else str(folder),
            quantized=self.quantized_components,
            streamed=self.streamed_components,
            auto_margin=self.auto_margin,
        )
        self.folder, self.options, self.entry = folder, options, entry
        self.mesh, self.device, self.dtype = options.mesh, options.device, options.dtype
        self.fsdp = options.parallel is not None and options.parallel.fsdp
        self.host = torch.device("cpu") if options.offload else self.device
        self.sharded = torch.device("cpu") if self.fsdp else self.host

        def build(component: str, dtype, linear_format=None, *, to=None):
            to = self.host if to is None else to
            return build_component(
                folder, index, component, device=to, dtype=dtype, linear_format=linear_format
            )

        return build

    def build_text_encoder(self, build, component: str, blocks: str | None, linear_format=None):
        """A large text encoder: built in the `sharded` placement and, under FSDP, sharded block by block
        (`blocks`: the block list's name; None: the model's declared stacks)."""
        model = build(component, self.dtype, linear_format, to=self.sharded)
        if self.fsdp:
            self.options.shard(model, blocks)
        return model

    def build_vae(self, build) -> None:
        """`vae` in `vae_dtype` (options.vae_dtype, else the family's `vae_default_dtype`, else the model
        dtype)."""
        self.vae_dtype = self.options.vae_dtype or self.vae_default_dtype or self.dtype
        self.vae = build("vae", self.vae_dtype)

    def build_transformer(self, build) -> None:
        """`transformers`: the one transformer, in the weight format of linear=, with the runtime options
        installed (dit_rt.runtime.RuntimeOptions.install)."""
        self.transformers = [build("transformer", self.dtype, self.options.linear_format, to=self.sharded)]
        self.options.install(self.transformers[0], self.entry.alias if self.entry else None)

    def offload_components(self, *components: torch.nn.Module | None) -> None:
        """Set `offload`: under offload= the `components` (text encoders, VAE, image encoder; None skipped)
        visit the device only while used, and under offload="model" the transformers too."""
        from dit_rt.offload import ComponentOffload

        self.offload = ComponentOffload(self.device)
        if self.options.offload:
            for m in components:
                if m is not None:
                    self.offload.add(m)
            if self.options.offload == "model":
                for m in self.transformers:
                    self.offload.add(m)

    @property
    def transformer(self) -> torch.nn.Module:
        return self.transformers[0]

    def expert_index(self, t: torch.Tensor) -> int:
        return 0

    # ------------------------------------------------------------------------------------- generate helpers

    @torch.no_grad()
    def t5_embeddings(self, prompts: list[str], max_length: int, clean: bool = True) -> torch.Tensor:
        """The T5 prompt states of `text_encoder` with `tokenizer` (Wan, Cosmos-Predict2, Cosmos-1.0): rows
        past each prompt's tokens zeroed; clean: Wan's prompt cleaning (models/text/tokenizer.py)."""
        from dit_rt.models.text import wan_text_embeddings

        with self.offload.use(self.text_encoder):
            return wan_text_embeddings(
                self.text_encoder,
                self.tokenizer,
                prompts,
                max_length=max_length,
                device=self.device,
                dtype=self.dtype,
                clean=clean,
            )

    def model_name(self, fallback: str) -> str:
        """How messages name the model: its catalog alias, else `fallback` ("this FLUX checkpoint")."""
        return self.entry.alias if self.entry else fallback

    @staticmethod
    def prompt_list(prompt) -> list[str]:
        if prompt is None:
            raise ValueError("generate() needs a prompt")
        return as_prompt_list(prompt)

    def resolve(self, height, width, num_frames, num_inference_steps, guidance_scale) -> Resolved:
        """Unset arguments -> the model's defaults (`self.defaults`). Steps and guidance are checked here,
        sizes and frames by the family's check_inputs."""
        d = self.defaults
        steps = d.num_inference_steps if num_inference_steps is None else num_inference_steps
        checks.check_positive_int("num_inference_steps", steps, d.num_inference_steps)
        g = d.guidance_scale if guidance_scale is None else guidance_scale
        checks.check_guidance("guidance_scale", g, d.guidance_scale)
        return Resolved(
            d.height if height is None else height,
            d.width if width is None else width,
            d.num_frames if num_frames is None else num_frames,
            steps,
            g,
        )

    def metadata(self, prompts: list[str], **fields) -> dict:
        """What produced this output, for GenerationOutput.metadata and the saved file's comment: the model,
        the prompt, the family's `fields` in order (None ones left out), the runtime options."""
        from dit_rt import __version__

        o = self.options
        meta = dict(
            model=self.entry.alias if self.entry else str(self.folder),
            prompt=prompts[0] if len(prompts) == 1 else list(prompts),
        )
        meta.update((k, v) for k, v in fields.items() if v is not None)
        meta["options"] = {
            "dtype": str(o.dtype).removeprefix("torch."),
            "attention": o.attention,
            "linear": o.linear,
            **{k: v for k, v in (("cache", o.cache), ("offload", o.offload)) if v},
        }
        meta.update(self.metadata_notes)
        meta["software"] = f"dit_rt {__version__}"
        return meta

    # --------------------------------------------------------------------------------------------- decode

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> float32 frames (B, T, H, W, C) in [0, 1] on the CPU.

        Under parallel=, the ranks of a dp group decode together (dit_rt.parallel.vae); every rank of the
        group must call this with the same latents.
        """
        return self.decode_latents(latents).cpu()

    def decode_sized(self, latents: torch.Tensor, height: int | None, width: int | None, cell: int):
        """`decode` of latents that do not record the aspect ratio (packed tokens): the grid `_grid_hw`
        (`cell` pixels a side; None before a generate()) is the last generate()'s, or height x width's."""
        if height is not None or width is not None:
            if height is None or width is None:
                raise ValueError("decode() needs both height and width, or neither")
            self._grid_hw = (height // cell, width // cell)
        if self._grid_hw is None:
            raise ValueError("decode() needs height and width: no generate() has run yet")
        return self.decode_latents(latents).cpu()

    def vae_frames(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latents [B, Z, (T,) h, w] in the VAE's dtype -> float32 frames [B, T, H, W, 3] in [0, 1] on the
        device (T = 1 for an image VAE). Under parallel=, the ranks of a dp group (cfg x ulysses x ring)
        decode together, each its own latent rows (dit_rt.parallel.vae)."""
        from dit_rt.parallel.vae import parallel_decode

        with self.offload.use(self.vae):
            x = parallel_decode(self.vae, z, self.mesh.group("replica"))  # [B, 3, (T,) H, W] in [-1, 1]
        frames = (x.float() / 2 + 0.5).clamp(0, 1)
        return frames.permute(0, 2, 3, 1).unsqueeze(1) if frames.ndim == 4 else frames.permute(0, 2, 3, 4, 1)

    @torch.no_grad()
    def denoise(self, r: Request) -> GenerationOutput:
        """The shared loop: `r` (the whole batch) -> GenerationOutput with the whole batch on every rank."""
        from dit_rt.cache import cache_branch, cache_reset, cache_stats, cache_step
        from dit_rt.ops.attention import attention_step
        from dit_rt.parallel import cfg_gather, cfg_select, gather_batch, split_batch

        mesh, batch, do_cfg = self.mesh, len(r.prompts), r.do_cfg
        dp_group, cfg_group = mesh.group("dp"), mesh.group("cfg")
        cfg_parallel = mesh.size("cfg") == 2
        if mesh.size("dp") > batch:
            raise ValueError(
                f"parallel dp={mesh.size('dp')} splits the prompt batch over {mesh.size('dp')} groups; "
                f"pass at least {mesh.size('dp')} prompts or lower dp"
            )
        if cfg_parallel and not do_cfg:
            raise ValueError(
                "parallel cfg=2 runs the conditional and unconditional passes on different ranks, but "
                f"guidance_scale={r.guidance[0]} <= 1 runs no unconditional pass; use guidance_scale > 1 or "
                "cfg=1"
            )
        metadata = r.metadata
        clock = _PhaseClock(self.device)
        # Data parallel: this dp group's part of the batch (everything in one process).
        prompts = split_batch(r.prompts, dp_group)
        negatives = split_batch(r.negatives, dp_group) if do_cfg else None
        uncond = None
        if cfg_parallel:  # this rank's pass only: cond on cfg rank 0, uncond on cfg rank 1
            cond = self.encode_prompt(cfg_select(prompts, negatives, cfg_group), **r.encode)
        else:
            cond = self.encode_prompt(prompts, **r.encode)
            uncond = self.encode_prompt(negatives, **r.encode) if do_cfg else None
        clock.lap("text")

        latents = r.latents
        if latents is None:
            # The whole batch's noise, identical on every rank (one shared seed), then this group's slice.
            seed = shared_seed(r.seed, self.device)
            metadata["seed"] = seed
            latents = torch.randn(r.shape, generator=make_generator(seed, self.device), device=self.device)
        latents = split_batch(latents.to(self.device, torch.float32), dp_group)
        latents, shared = self.prepare_latents(latents, r)
        cond = Conditioning(cond, shared)
        uncond = Conditioning(uncond, shared)
        scheduler = self.make_scheduler(r)
        combine = GUIDANCE[self.guidance]

        show = r.progress_bar and self.options.rank == 0
        # Step caches keep one state per expert and per guidance branch; under cfg parallel each rank runs
        # one branch.
        first_branch = "uncond" if cfg_parallel and mesh.rank("cfg") == 1 else "cond"
        cache_reset(self.transformers, r.steps)
        # Timestep values on the host for the expert choice, and scheduler steps by index: comparing a device
        # timestep would wait for the step's queued work, leaving the GPU idle while the next one launches.
        host_timesteps = scheduler.timesteps.cpu()
        # offload="model": the active expert's weights on the device, swapped at the boundary
        with ExitStack() as on_device:
            active = None
            try:
                for i, t in enumerate(progress(scheduler.timesteps, show)):
                    self.step_index = i
                    expert, scale = self._expert(host_timesteps[i], *r.guidance)
                    if expert is not active:
                        on_device.close()
                        on_device.enter_context(self.offload.use(expert))
                        active = expert
                    cache_step(expert, i)
                    attention_step(self.transformers, i, r.steps)  # svg's dense warm-up steps
                    with cache_branch(expert, first_branch):
                        pred = self.predict(expert, latents, t, cond)
                    if cfg_parallel:
                        pred, pred_uncond = cfg_gather(pred, cfg_group)  # both ranks get both predictions
                        pred = combine(pred_uncond, pred, scale)
                    elif do_cfg:
                        with cache_branch(expert, "uncond"):
                            pred = combine(self.predict(expert, latents, t, uncond), pred, scale)
                    latents = scheduler.step(pred, i, latents)
                    if r.callback is not None:
                        r.callback(i, t, latents)  # under data parallel: this dp group's part of the batch
            finally:
                self.step_index = None
        stats = cache_stats(self.transformers)
        if self.options.offload == "block":  # the streaming slots are idle until the next generate
            from dit_rt.offload import release_slots

            release_slots(self.transformers)
        clock.lap("steps")

        out = dict(fps=r.fps, stats=stats, seed=metadata.get("seed"), metadata=metadata, timings=clock.laps)
        if r.output_type == "latents":
            return GenerationOutput(torch.empty(0), gather_batch(latents, dp_group, batch), **out)
        frames = gather_batch(self.decode_latents(latents), dp_group, batch).cpu()
        clock.lap("decode")
        latents = gather_batch(latents, dp_group, batch)
        return GenerationOutput(frames=frames, latents=latents, **out)

    def _expert(self, t: torch.Tensor, *scales: float):
        """(the expert that runs at timestep t, its guidance scale); a parked expert comes to the device."""
        i = self.expert_index(t)
        if self.park_experts:
            self._make_resident(i)
        return self.transformers[i], scales[min(i, len(scales) - 1)]

    def _make_resident(self, i: int) -> None:
        """Move expert i to the compute device and the others to host memory, if not already there."""
        active = self.transformers[i]
        if next(active.parameters()).device == self.device:
            return
        for parked in self.transformers:
            if parked is not active:
                parked.to("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        active.to(self.device)


def shared_seed(seed: int | None, device: torch.device) -> int:
    """The seed of the initial noise: `seed`, or when None one drawn at random, so that the output can report
    it. With several processes rank 0 draws it for all: every rank must draw the same noise (each dp group
    then takes its slice; sequence and cfg ranks need identical inputs)."""
    import torch.distributed as dist

    if seed is not None:
        return seed
    drawn = torch.randint(0, 2**32, (1,), generator=make_generator(None, torch.device("cpu")))
    if dist.is_initialized() and dist.get_world_size() > 1:
        drawn = drawn.to(device)
        dist.broadcast(drawn, src=0)
    return int(drawn.item())
