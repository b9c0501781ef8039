"""What a clip of the tiny shapes model shows, checked without a human: the prompt grammar of its training
set and a measure of the largest non-background blob (colour, shape, motion) over the frames.

The shipped demo model (`dit_rt/tiny/`) was trained on clips rendered from prompts of one form,
"a <colour> <shape> <motion> on a <colour> background", so the vocabulary and the palette live here: the
demo validates prompts against them, tools/train_tiny.py renders from them, and `check_clip` says whether
a generated clip shows what its prompt asks. Pure torch (no numpy / scipy), imported only by the
measuring functions: the CLI's parser reads the grammar without loading torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.12),
    "green": (0.10, 0.75, 0.20),
    "blue": (0.12, 0.25, 0.95),
    "yellow": (0.95, 0.88, 0.10),
    "white": (0.95, 0.95, 0.95),
    "black": (0.05, 0.05, 0.05),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
MOTIONS = ("moving", "growing", "shrinking", "turning")
VOCABULARY = ("a", "on", "background", *PALETTE, *SHAPES, *DIRECTIONS, *MOTIONS)
DEFAULT_PROMPT = "a red circle moving right on a blue background"
DEMO_SIZE, DEMO_FRAMES = 32, 9  # what the tiny model was trained on (tools/train_tiny.py)
DEMO_STEPS, DEMO_GUIDANCE = 25, 3.0  # `dit-rt demo`'s sampling (chosen with the clip check, BENCHMARKS.md)
GRAMMAR = (
    "a <colour> <shape> <motion> on a <colour> background; motion: moving left|right|up|down, growing, "
    "shrinking, turning <colour>"
)


@dataclass(frozen=True)
class Scene:
    """One prompt of the training grammar. `target`: the direction (moving) or the end colour (turning)."""

    colour: str
    shape: str
    motion: str
    target: str | None
    background: str

    @property
    def prompt(self) -> str:
        motion = f"{self.motion} {self.target}" if self.target else self.motion
        return f"a {self.colour} {self.shape} {motion} on a {self.background} background"


def parse_prompt(prompt: str) -> Scene:
    """The Scene a prompt of the grammar describes. Raises ValueError naming the unknown words (and the
    vocabulary), or quoting the grammar when the words are known but do not follow it."""
    words = prompt.lower().replace(",", " ").replace(".", " ").split()
    unknown = [w for w in words if w not in VOCABULARY]
    if unknown:
        raise ValueError(
            f"unknown word(s) {', '.join(repr(w) for w in unknown)}: the tiny model knows only "
            f"{', '.join(VOCABULARY)}"
        )
    head, motion, tail = words[:3], words[3:-4], words[-4:]
    ok = (
        len(words) in (8, 9)
        and head[0] == "a"
        and head[1] in PALETTE
        and head[2] in SHAPES
        and tail[:2] == ["on", "a"]
        and tail[2] in PALETTE
        and tail[3] == "background"
        and head[1] != tail[2]
    )
    if ok and len(motion) == 1:
        ok = motion[0] in ("growing", "shrinking")
    elif ok:
        ok = (motion[0] == "moving" and motion[1] in DIRECTIONS) or (
            motion[0] == "turning" and motion[1] in PALETTE and motion[1] not in (head[1], tail[2])
        )
    if not ok:
        raise ValueError(
            f"{prompt!r} does not follow the tiny model's grammar: {GRAMMAR}; the shape's colours differ "
            "from the background's"
        )
    return Scene(head[1], head[2], motion[0], motion[1] if len(motion) == 2 else None, tail[2])


# ---------------------------------------------------------------------------------------------- the check

MIN_TRAVEL = 0.12  # of the frame width: a centroid move shorter than this is not "moving"
MIN_GROWTH = 2.0  # area ratio last / first frames for "growing" (1 / it for "shrinking")
# Where a clip both travels and changes area past these thresholds, the stronger signal names the motion:
# travel / (MIN_TRAVEL * width) against |log(area ratio)| / log(MIN_GROWTH). The training clips' moves are
# 3-4.5 travel units at an area ratio of 1, their growth 4-7x (2-2.8 units) in place.


@dataclass(frozen=True)
class ClipSummary:
    """What a clip shows: the background's and the blob's palette colours, its shape (from how much of its
    bounding box it fills), its centroid displacement (dx right, dy down, pixels) and area ratio from the
    first frames to the last ones, and the motion word(s) these amount to."""

    background: str
    colour_start: str
    colour_end: str
    shape: str
    dx: float
    dy: float
    growth: float
    motion: str


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    summary: ClipSummary | None
    failures: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        s = self.summary
        seen = (
            "no blob found"
            if s is None
            else f"a {s.colour_start} {s.shape} {s.motion} on a {s.background} background "
            f"(dx {s.dx:+.1f}, dy {s.dy:+.1f} px, area x{s.growth:.2f})"
        )
        return ("pass: " if self.ok else "FAIL: ") + seen + "".join(f"; {f}" for f in self.failures)


def nearest_colour(rgb: torch.Tensor) -> str:
    """The palette name closest to an RGB triple in [0, 1]."""
    import torch

    names = list(PALETTE)
    d = (torch.tensor([PALETTE[n] for n in names]) - rgb.float().cpu()).norm(dim=1)
    return names[int(d.argmin())]


def _largest_blob(mask: torch.Tensor) -> torch.Tensor:
    """The largest 8-connected component of a [H, W] bool mask (label propagation by max-pooling)."""
    import torch
    import torch.nn.functional as F

    h, w = mask.shape
    labels = torch.where(mask, torch.arange(1, h * w + 1, dtype=torch.float32).view(h, w), 0.0)
    for _ in range(h * w):
        grown = F.max_pool2d(labels[None, None], 3, stride=1, padding=1)[0, 0] * mask
        if torch.equal(grown, labels):
            break
        labels = grown
    ids, counts = labels[mask].unique(return_counts=True)
    if not len(ids):
        return mask
    return labels == ids[counts.argmax()]


def describe(clip: torch.Tensor, threshold: float = 0.3) -> ClipSummary | None:
    """Measure a clip [T, H, W, 3] (float in [0, 1] or uint8). The background is the border pixels' median
    colour; the blob is the largest component of pixels farther than `threshold` from it. None when some
    frame has no blob."""
    import torch

    clip = clip.float() / 255 if clip.dtype == torch.uint8 else clip.float()
    t, h, w, _ = clip.shape
    border = torch.cat([clip[:, 0], clip[:, -1], clip[:, :, 0], clip[:, :, -1]], dim=1).reshape(-1, 3)
    bg = border.median(dim=0).values
    far = (clip - bg).norm(dim=-1) > threshold  # [T, H, W]
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )
    centres, areas, colours, fills = [], [], [], []
    for i in range(t):
        blob = _largest_blob(far[i])
        n = int(blob.sum())
        if n < 4:
            return None
        centres.append(torch.stack([xs[blob].mean(), ys[blob].mean()]))
        areas.append(n)
        colours.append(clip[i][blob])
        box = (xs[blob].max() - xs[blob].min() + 1) * (ys[blob].max() - ys[blob].min() + 1)
        fills.append(n / float(box))
    k = max(1, t // 4)  # the first and last quarter of the frames
    start = torch.stack(centres[:k]).mean(0)
    end = torch.stack(centres[-k:]).mean(0)
    growth = (sum(areas[-k:]) / k) / (sum(areas[:k]) / k)
    fill = float(torch.tensor(fills).median())
    shape = "square" if fill > 0.86 else "circle" if fill > 0.64 else "triangle"
    colour_start = nearest_colour(torch.cat(colours[:k]).median(dim=0).values)
    colour_end = nearest_colour(torch.cat(colours[-k:]).median(dim=0).values)
    dx, dy = (end - start).tolist()
    travel = max(abs(dx), abs(dy)) / (MIN_TRAVEL * w)
    change = abs(math.log(growth)) / math.log(MIN_GROWTH)
    if change >= 1 and change >= travel:
        motion = "growing" if growth > 1 else "shrinking"
    elif travel >= 1:
        motion = "moving " + (
            ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
        )
    elif colour_end != colour_start:
        motion = f"turning {colour_end}"
    else:
        motion = "still"
    return ClipSummary(nearest_colour(bg), colour_start, colour_end, shape, dx, dy, growth, motion)


def check_clip(clip: torch.Tensor, prompt: str | Scene, shape: bool = False) -> CheckResult:
    """Whether a clip [T, H, W, 3] shows what `prompt` (of the grammar) asks: the background colour, the
    blob's starting colour and its motion (a move of at least MIN_TRAVEL of the width in the prompt's
    direction and more than across it, an area ratio of MIN_GROWTH, or the end colour). With `shape`, its
    shape too: off by default, as the shipped model's 32x32 VAE rounds corners off (its clips show a
    blob of the right colour and motion, not always a crisp square or triangle)."""
    scene = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    s = describe(clip)
    if s is None:
        return CheckResult(False, None, ["no blob in some frame"])
    want = f"{scene.motion} {scene.target}" if scene.target else scene.motion
    failures = []
    if s.background != scene.background:
        failures.append(f"background {s.background}, wanted {scene.background}")
    if s.colour_start != scene.colour:
        failures.append(f"colour {s.colour_start}, wanted {scene.colour}")
    if shape and s.shape != scene.shape:
        failures.append(f"shape {s.shape}, wanted {scene.shape}")
    if scene.motion == "turning":
        moved = s.motion.startswith(("moving", "growing", "shrinking"))
        if s.colour_end != scene.target or moved:
            failures.append(f"{s.motion} ending {s.colour_end}, wanted {want}")
    elif s.motion != want:
        failures.append(f"{s.motion}, wanted {want}")
    return CheckResult(not failures, s, failures)
