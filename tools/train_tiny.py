"""Train the tiny shapes text-to-video model that `dit-rt demo` ships (dit_rt/tiny/).

A Wan-architecture model in the real classes and Hub layout (WanTransformer3DModel, AutoencoderKLWan,
UMT5 text encoder, a Unigram tokenizer over the prompt vocabulary, WanPipeline), trained on clips rendered
on the fly: one coloured shape on a plain background, moving, growing, shrinking or changing colour as a
prompt of `dit_rt.clipcheck`'s grammar says. Two stages:

1. the VAE as an autoencoder (MSE with the shape's pixels weighed up, + L1 + a small KL, with latent
   noise so the decoder tolerates the DiT's errors); its latent statistics become `latents_mean` /
   `latents_std` in its config;
2. the transformer and the text encoder together by flow matching as Wan is trained:
   x_s = (1 - s) x0 + s noise, target noise - x0, s drawn through the scheduler's shift, timestep 1000 s,
   prompts dropped to "" 10% of the time so classifier-free guidance works.

Runs on CUDA when available (each stage's loss compiled: a step of a model this small is bound by kernel
launches), else on the CPU. From --seed the data and the initial weights are the same on every run; CPU runs
repeat bit for bit on the same machine and thread count, GPU runs up to CUDA kernels' rounding differences.
`--smoke` trains a few steps of each stage in seconds (CI). The checkpoint is written in fp16 to --out
(default dit_rt/tiny).

    python tools/train_tiny.py --device cuda        # the shipped model: 6.5 min on one H200
    python tools/train_tiny.py --device cpu         # the same recipe on the CPU: hours
    python tools/train_tiny.py --smoke --out /tmp/t # seconds
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dit_rt import demo
from dit_rt.clipcheck import DIRECTIONS, PALETTE, SHAPES, VOCABULARY, Scene
from dit_rt.demo import DEMO_FRAMES, DEMO_SIZE, INDEX, SCHEDULER, tokenizer_json, write_checkpoint

SIZE, FRAMES = DEMO_SIZE, DEMO_FRAMES
TEXT_DIM = 64
# The demo's tiny Wan configurations (dit_rt.demo), widened for training and with 1x1 patches.
TRANSFORMER = demo.TRANSFORMER | dict(
    patch_size=[1, 1, 1],  # a 32x32 clip is a 4x4 latent: one token per latent pixel
    num_attention_heads=4,
    attention_head_dim=32,
    text_dim=TEXT_DIM,
    freq_dim=64,
    ffn_dim=256,
    num_layers=4,
)
VAE = dict(demo.VAE)
TEXT_ENCODER = demo.TEXT_ENCODER | dict(d_model=TEXT_DIM, d_kv=16, d_ff=128)
FLOW_SHIFT = 3.0


# ---------------------------------------------------------------------------------------------- dataset


def random_scene(g: torch.Generator) -> Scene:
    """A prompt of the grammar, uniformly over shapes, colours and motions."""

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    colours = list(PALETTE)
    colour = pick(colours)
    background = pick([c for c in colours if c != colour])
    motion = pick(["moving", "moving", "growing", "shrinking", "turning"])
    target = None
    if motion == "moving":
        target = pick(DIRECTIONS)
    elif motion == "turning":
        target = pick([c for c in colours if c not in (colour, background)])
    return Scene(colour, pick(SHAPES), motion, target, background)


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def render(scene: Scene, g: torch.Generator, frames: int = FRAMES, size: int = SIZE) -> torch.Tensor:
    """One clip of `scene` [T, H, W, 3] in [0, 1]; position, size and speed drawn from `g`. Edges are
    anti-aliased (coverage from the signed distance) so that small moves change pixels smoothly."""
    u = torch.linspace(0, 1, frames)  # [T] progress through the clip
    r0 = _uniform(g, 0.13, 0.18) * size  # half-extent
    r = torch.full((frames,), r0)
    if scene.motion in ("growing", "shrinking"):
        small, big = _uniform(g, 0.10, 0.12) * size, _uniform(g, 0.25, 0.30) * size
        r = small + (big - small) * (u if scene.motion == "growing" else 1 - u)
    margin = float(r.max()) + 1
    cx = torch.full((frames,), _uniform(g, margin, size - margin))
    cy = torch.full((frames,), _uniform(g, margin, size - margin))
    if scene.motion == "moving":
        travel = _uniform(g, 0.35, 0.55) * size
        lo, hi = margin, size - margin - travel
        start = _uniform(g, lo, max(lo, hi))
        path = start + travel * u
        if scene.target in ("left", "up"):
            path = size - path
        if scene.target in ("left", "right"):
            cx = path
        else:
            cy = path
    colour = torch.tensor(PALETTE[scene.colour]).expand(frames, 3)
    if scene.motion == "turning":
        end = torch.tensor(PALETTE[scene.target])
        w = ((u - 0.3) / 0.4).clamp(0, 1)[:, None]  # the change happens over the middle of the clip
        colour = (1 - w) * colour + w * end
    px = torch.arange(size) + 0.5  # pixel centres
    dx = px[None, None, :] - cx[:, None, None]  # [T, 1, W]
    dy = px[None, :, None] - cy[:, None, None]  # [T, H, 1]
    rr = r[:, None, None]
    if scene.shape == "circle":
        sdf = (dx**2 + dy**2).sqrt() - rr
    elif scene.shape == "square":
        sdf = torch.maximum(dx.abs(), dy.abs()) - rr
    else:  # apex up, base 2r wide at the bottom: the edges' slope is 2 (normal scaled by 1 / sqrt(5))
        sdf = torch.maximum(dy.abs() - rr, (2 * dx.abs() - dy - rr) / math.sqrt(5))
    cover = (0.5 - sdf).clamp(0, 1)[..., None]  # [T, H, W, 1], one pixel of anti-aliasing
    background = torch.tensor(PALETTE[scene.background])
    return (1 - cover) * background + cover * colour[:, None, None, :]


def batch(g: torch.Generator, n: int, frames: int = FRAMES) -> tuple[list[str], torch.Tensor]:
    """n random prompts and their clips as VAE input [n, 3, T, H, W] in [-1, 1]."""
    scenes = [random_scene(g) for _ in range(n)]
    clips = torch.stack([render(s, g, frames) for s in scenes])  # [n, T, H, W, 3]
    return [s.prompt for s in scenes], clips.permute(0, 4, 1, 2, 3) * 2 - 1


# ---------------------------------------------------------------------------------------------- models


def build(seed: int):
    from dit_rt.models.text import UMT5Config, UMT5Encoder
    from dit_rt.models.wan import WanTransformer, WanTransformerConfig, WanVAE, WanVAEConfig

    torch.manual_seed(seed)
    vae = WanVAE(WanVAEConfig.from_config(VAE))
    transformer = WanTransformer(WanTransformerConfig.from_config(TRANSFORMER))
    text = UMT5Encoder(UMT5Config.from_config(TEXT_ENCODER))
    for model in (vae, transformer, text):
        init(model)
    return vae, transformer, text


def init(model: torch.nn.Module) -> None:
    """Fresh-training init (dit_rt's modules are built for loading and hold uninitialised memory): fan-in
    scaled normal weights, zero biases, unit norm scales, a small modulation table; the transformer's output
    projection starts at zero (a zero velocity)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (p.ndim == 1 and not name.endswith("bias")) or name.endswith("gamma"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            elif name.endswith("scale_shift_table"):
                p.normal_(0, 0.02)
            else:
                fan_in = p[0].numel()
                p.normal_(0, 1 / math.sqrt(fan_in))
        proj_out = getattr(model, "proj_out", None)
        if proj_out is not None:
            proj_out.weight.zero_()


def vae_encode(vae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable one-pass encode (WanVAE.encode is inference-only): [B, 3, T, H, W] in [-1, 1] ->
    posterior mean and log-variance [B, Z, T', h, w]."""
    mean, logvar = vae.quant_conv(vae.encoder(x)).chunk(2, dim=1)
    return mean, logvar.clamp(-30, 20)


def vae_decode(vae, z: torch.Tensor) -> torch.Tensor:
    """Differentiable one-pass decode: [B, Z, T', h, w] -> [B, 3, T, H, W], unclamped."""
    return vae.decoder(vae.post_quant_conv(z))


def latent_shape(vae, x: torch.Tensor) -> tuple[int, ...]:
    """The posterior's shape [B, Z, T', h, w] for clips x [B, 3, T, H, W] (the latent noise's shape)."""
    c = vae.config
    b, _, t, h, w = x.shape
    sp = c.scale_factor_spatial
    return (b, c.z_dim, (t - 1) // c.scale_factor_temporal + 1, h // sp, w // sp)


def vae_loss(vae, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage 1's objective on a batch x [B, 3, T, H, W] with latent noise eps: (loss, reconstruction, KL)."""
    mean, logvar = vae_encode(vae, x)
    y = vae_decode(vae, mean + 0.02 * eps)  # decoder robust to latent noise
    # The shape is a tenth of the frame: weigh its pixels up, or the cheapest fit is the background alone.
    fg = ((x - x[:, :, :, :1, :1]).abs().amax(1, keepdim=True) > 0.1).float()  # [B, 1, T, H, W]
    rec = ((y - x).pow(2) * (1 + 9 * fg)).mean() + (y - x).abs().mean()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
    return rec + 1e-4 * kl + 1e-3 * mean.pow(2).mean(), rec.detach(), kl.detach()


def optimizer(params, device, **kw) -> torch.optim.AdamW:
    """AdamW, fused into a few kernels on CUDA (a step of these small models is bound by launches)."""
    return torch.optim.AdamW(params, fused=device.type == "cuda", **kw)


def compiled(fn, on: bool):
    """fn, or fn compiled with static shapes (each stage's step keeps one shape)."""
    return torch.compile(fn, dynamic=False) if on else fn


def train_vae(vae, g, device, steps: int, bs: int, frames: int, log, compile: bool = False) -> None:
    params = list(vae.parameters())
    opt = optimizer(params, device, lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=steps, pct_start=0.02)
    step_loss = compiled(vae_loss, compile)
    for step in range(steps):
        _, x = batch(g, bs, frames)
        eps = torch.randn(latent_shape(vae, x), generator=g)
        loss, rec, kl = step_loss(vae, x.to(device, non_blocking=True), eps.to(device, non_blocking=True))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae {step}/{steps} loss {rec.item():.4f} kl {kl.item():.3f}")


@torch.no_grad()
def latent_stats(vae, g, device, n: int, frames: int) -> tuple[list[float], list[float]]:
    zs = [vae_encode(vae, batch(g, 8, frames)[1].to(device))[0] for _ in range(max(1, n // 8))]
    z = torch.cat(zs).transpose(0, 1).flatten(1)  # [Z, N]
    return z.mean(1).tolist(), z.std(1).clamp_min(1e-3).tolist()


class LatentPool:
    """Encoded clips to train the transformer on. Encoding is most of a CPU step's cost, so a pool of
    `size` clips is encoded once and `refresh` of them per step are replaced by new ones, encoded `chunk`
    at a time (one encoder pass per chunk: on a GPU a pass of a few clips costs its launches)."""

    def __init__(self, vae, g, device, size: int, refresh: int, frames: int, chunk: int = 64):
        self.vae, self.g, self.device, self.refresh, self.frames = vae, g, device, refresh, frames
        self.chunk = max(refresh, min(chunk, size))
        self.prompts, self.latents = [], []
        while len(self.prompts) < size:
            p, z = self.encode(min(16, size - len(self.prompts)))
            self.prompts += p
            self.latents.append(z)
        self.latents = torch.cat(self.latents)
        self.next = self.due = 0

    @torch.no_grad()
    def encode(self, n: int) -> tuple[list[str], torch.Tensor]:
        prompts, x = batch(self.g, n, self.frames)
        return prompts, self.vae.normalize_latents(vae_encode(self.vae, x.to(self.device))[0])

    def sample(self, bs: int) -> tuple[list[str], torch.Tensor]:
        self.due += self.refresh
        if self.refresh and self.due >= self.chunk:
            p, z = self.encode(self.due)
            rows = [(self.next + i) % len(self.prompts) for i in range(self.due)]
            for j, prompt in zip(rows, p):
                self.prompts[j] = prompt
            self.latents[torch.tensor(rows, device=self.latents.device)] = z
            self.next = (self.next + self.due) % len(self.prompts)
            self.due = 0
        idx = torch.randint(len(self.prompts), (bs,), generator=self.g)
        return [self.prompts[i] for i in idx.tolist()], self.latents[idx.to(self.latents.device)]


def text_tokens(tokenizer, prompts: list[str], device, max_length: int = 512):
    """Token ids and mask [B, n], n the longest prompt's length rounded up to 16 (a fixed shape for the
    compiled step; the mask keeps the extra positions out of attention and the context)."""
    from dit_rt.models.text import prompt_clean

    ids, mask = tokenizer.encode([prompt_clean(p) for p in prompts], max_length)
    n = min(max_length, -(-int(mask.sum(dim=1).max()) // 16) * 16)
    return ids[:, :n].to(device, non_blocking=True), mask[:, :n].to(device, non_blocking=True)


def text_context(text, ids: torch.Tensor, mask: torch.Tensor, max_length: int) -> torch.Tensor:
    """`wan_text_embeddings` (inference-only) with gradients: [B, max_length, d_model], the rows past each
    prompt's tokens zero, as the pipeline passes them."""
    hidden = text(ids, mask)  # [B, n, d_model]
    return F.pad(hidden * mask[..., None].to(hidden.dtype), (0, 0, 0, max_length - ids.shape[1]))


def dit_loss(transformer, text, ids, mask, x0, noise, s) -> torch.Tensor:
    """Stage 2's flow-matching objective: x_s = (1 - s) x0 + s noise against the target noise - x0."""
    sv = s.view(-1, 1, 1, 1, 1)
    xt = (1 - sv) * x0 + sv * noise
    v = transformer(xt, s * 1000, text_context(text, ids, mask, 512))
    return F.mse_loss(v.float(), noise - x0)


def train_dit(pool, transformer, text, tokenizer, g, device, steps, bs, log, checkpoint, compile=False):
    params = [*transformer.parameters(), *text.parameters()]
    opt = optimizer(params, device, lr=1e-3, weight_decay=0.01, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=steps, pct_start=0.05)
    step_loss = compiled(dit_loss, compile)
    avg = None
    for step in range(steps):
        prompts, x0 = pool.sample(bs)
        drop = torch.rand(bs, generator=g) < 0.1
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        u = torch.rand(bs, generator=g)
        s = (FLOW_SHIFT * u / (1 + (FLOW_SHIFT - 1) * u)).to(device)  # the scheduler's shifted sigmas
        noise = torch.randn(x0.shape, generator=g).to(device, non_blocking=True)
        ids, mask = text_tokens(tokenizer, prompts, device)
        loss = step_loss(transformer, text, ids, mask, x0, noise, s)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        sched.step()
        # A running mean kept on the device: reading the loss every step would wait for the GPU.
        avg = loss.detach().clone() if avg is None else avg.lerp_(loss.detach(), 0.02)
        if step % 100 == 0 or step == steps - 1:
            log(f"dit {step}/{steps} loss {loss.item():.4f} avg {avg.item():.4f}")
        if checkpoint and step and step % checkpoint == 0:
            yield step


def save(out: Path, vae, transformer, text, stats) -> Path:
    """The fp16 checkpoint in the Hub layout (the models themselves stay in training precision)."""
    vae, transformer, text = (copy.deepcopy(m).cpu().half() for m in (vae, transformer, text))
    vae_config = dict(VAE, latents_mean=stats[0], latents_std=stats[1])
    components = {
        "transformer": {
            "diffusion_pytorch_model.safetensors": transformer.half(),
            "config.json": TRANSFORMER,
        },
        "vae": {"diffusion_pytorch_model.safetensors": vae.half(), "config.json": vae_config},
        "text_encoder": {"model.safetensors": text.half(), "config.json": TEXT_ENCODER},
        "scheduler": {"scheduler_config.json": dict(SCHEDULER, flow_shift=FLOW_SHIFT)},
        "tokenizer": {"tokenizer.json": tokenizer_json(VOCABULARY)},
    }
    return write_checkpoint(out, INDEX, components)


def fit_steps(a, vae, transformer, text, device, log) -> tuple[int, int]:
    """Step counts that fill a.fit_minutes (VAE a third, transformer the rest, less the time this timing
    takes: compiling is part of it, and the copies' compiled code serves the real models), timed on copies
    of the models with their own data generator, so the real run is the one the printed counts reproduce."""
    from dit_rt.models.text import T5Tokenizer

    def seconds_per_step(run, n: int = 48, warm: int = 5) -> tuple[float, float]:
        t = time.perf_counter()
        run(warm)  # warm-up: allocator, cuDNN autotuning, compiling
        sync()
        warm_s = time.perf_counter() - t
        t = time.perf_counter()
        run(n)
        sync()
        return (time.perf_counter() - t) / n, warm_s

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    start = time.perf_counter()
    g = torch.Generator().manual_seed(a.seed + 7)
    v, tr, te = (copy.deepcopy(m) for m in (vae, transformer, text))
    quiet = lambda msg: None  # noqa: E731
    vae_s, vae_warm = seconds_per_step(
        lambda n: train_vae(v, g, device, n, a.vae_batch, a.vae_frames, quiet, a.compile)
    )
    tok_dir = Path(a.out) / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    (tok_dir / "tokenizer.json").write_text(tokenizer_json(VOCABULARY))
    tok = T5Tokenizer.from_folder(tok_dir)
    v.requires_grad_(False)
    pool = LatentPool(v, g, device, 64, a.refresh, FRAMES)
    refresh_every = pool.chunk // a.refresh if a.refresh else 8  # steps between two encoder passes
    dit_s, dit_warm = seconds_per_step(
        lambda n: list(train_dit(pool, tr, te, tok, g, device, n, a.dit_batch, quiet, 0, a.compile)),
        # the warm-up includes a pool refresh: without it the timed steps held the encoder's first pass at
        # the chunk's batch size (cuDNN picking its kernels, most likely), and the estimate was 2x on an H200
        n=4 * refresh_every,
        warm=refresh_every + 1,
    )
    spent = time.perf_counter() - start
    # margin: latent statistics, the pool, saving
    budget = a.fit_minutes * 60 * 0.95 - 10 - spent
    if budget <= 0:
        raise SystemExit(
            f"--fit-minutes {a.fit_minutes} leaves no time to train after {spent:.0f} s of timing"
        )
    vae_steps, dit_steps = int(budget / 3 / vae_s), int(budget * 2 / 3 / dit_s)
    log(
        f"{vae_s * 1e3:.1f} ms per VAE step, {dit_s * 1e3:.1f} ms per transformer step (warm-up "
        f"{vae_warm:.0f} s, {dit_warm:.0f} s): --vae-steps {vae_steps} --dit-steps {dit_steps} fill "
        f"{a.fit_minutes} min"
    )
    return vae_steps, dit_steps


def main(argv: list[str] | None = None) -> int:
    from dit_rt.models.text import T5Tokenizer

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "dit_rt" / "tiny"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--vae-steps", type=int, default=5000)
    p.add_argument("--vae-batch", type=int, default=8)
    p.add_argument("--vae-frames", type=int, default=9)
    p.add_argument("--dit-steps", type=int, default=6000)
    p.add_argument("--dit-batch", type=int, default=64)
    p.add_argument("--vae-state", help="a file keeping the stage-1 VAE: loaded if it exists, else written")
    p.add_argument("--pool", type=int, default=2048, help="encoded clips the transformer trains on")
    p.add_argument("--refresh", type=int, default=8, help="pool clips replaced by new ones each step")
    p.add_argument("--save-every", type=int, default=0, help="also write the checkpoint every N steps")
    p.add_argument(
        "--fit-minutes",
        type=float,
        help="choose --vae-steps / --dit-steps to fill this many minutes (a third for the VAE), from the "
        "speed of a few throwaway steps of each stage; the counts are printed to reproduce the run",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="torch.compile each stage's loss, forward and backward (default: on CUDA): on a GPU a step of "
        "these small models is bound by kernel launches, and compiling fuses most of them",
    )
    p.add_argument("--smoke", action="store_true", help="a few steps of each stage (seconds, for CI)")
    a = p.parse_args(argv)
    if a.smoke:
        a.vae_steps, a.vae_batch, a.vae_frames, a.dit_steps, a.dit_batch = 2, 1, 5, 2, 2
    device = torch.device(a.device)
    if a.compile is None:
        a.compile = device.type == "cuda" and not a.smoke
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    g = torch.Generator().manual_seed(a.seed)  # stage 1's data; stage 2 has its own, so --vae-state resumes
    vae, transformer, text = (m.to(device) for m in build(a.seed))
    n = sum(p.numel() for m in (vae, transformer, text) for p in m.parameters())
    log(f"{n / 1e6:.2f}M parameters on {device}")
    if a.fit_minutes and not a.smoke:
        a.vae_steps, a.dit_steps = fit_steps(a, vae, transformer, text, device, log)
    if a.vae_state and Path(a.vae_state).is_file():
        vae.load_state_dict(torch.load(a.vae_state, map_location=device))
        log(f"VAE from {a.vae_state}")
    else:
        train_vae(vae, g, device, a.vae_steps, a.vae_batch, a.vae_frames, log, a.compile)
        if a.vae_state:
            torch.save(vae.state_dict(), a.vae_state)
    g = torch.Generator().manual_seed(a.seed + 1)
    stats = latent_stats(vae, g, device, 8 if a.smoke else 256, FRAMES)
    vae.config = type(vae.config).from_config(dict(VAE, latents_mean=stats[0], latents_std=stats[1]))
    tok_dir = Path(a.out) / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    (tok_dir / "tokenizer.json").write_text(tokenizer_json(VOCABULARY))
    tokenizer = T5Tokenizer.from_folder(tok_dir)
    vae.requires_grad_(False)
    pool = LatentPool(vae, g, device, 16 if a.smoke else a.pool, 1 if a.smoke else a.refresh, FRAMES)
    log(f"encoded a pool of {len(pool.prompts)} clips")
    for step in train_dit(
        pool, transformer, text, tokenizer, g, device, a.dit_steps, a.dit_batch, log, a.save_every, a.compile
    ):
        save(Path(a.out), vae, transformer, text, stats)
        log(f"saved step {step}")
    folder = save(Path(a.out), vae, transformer, text, stats)
    log(f"wrote {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
