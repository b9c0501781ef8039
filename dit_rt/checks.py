"""Generation arguments, checked before a model is resolved, downloaded or loaded.

Each rule is a small function that raises ValueError naming the fix (the nearest valid value where there is
one). The pipelines call the same rules on their own inputs, so a request is judged the same way before and
after a load. What a model accepts (`Constraints`) comes from the catalog for aliases, and from the config
files for local folders and for Hub snapshots already in the cache: no weight file is read, nothing is
downloaded, and no file is left behind.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

IMAGE_KINDS = ("none", "optional", "required")
# What Pillow reads under the usual names; with Pillow installed, its own list is used.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class Constraints:
    """What a model's generation arguments must satisfy; None where it is not known before loading.

    spatial: height and width are multiples of it (the VAE's downsampling x the transformer's patch).
    temporal: num_frames is temporal * k + 1 (the VAE compresses time by `temporal` after the first frame).
    single_frame: an image model: num_frames is 1.
    image: "none" (text only: an image is an error), "optional" or "required".
    """

    spatial: int | None = None
    temporal: int | None = None
    single_frame: bool = False
    image: str | None = None

    def __post_init__(self):
        if self.image not in (None, *IMAGE_KINDS):
            raise ValueError(f"image={self.image!r}: expected one of {IMAGE_KINDS} or None")


# ------------------------------------------------------------------------------------------------ rules


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fix(nearest=None, default=None) -> str:
    """The fix part of a message: '; try 0.0, or leave it unset for the model's default 5.0'."""
    parts = [f"try {nearest}"] if nearest is not None else []
    parts.append("leave it unset for the model's default" + (f" {default}" if default is not None else ""))
    return "; " + ", or ".join(parts)


def check_multiple(name: str, value, multiple: int) -> None:
    """height / width: a positive int multiple of `multiple` (VAE x patch)."""
    if not _is_int(value) or value <= 0 or value % multiple:
        nearest = max(multiple, round(value / multiple) * multiple) if _is_real(value) else multiple
        raise ValueError(
            f"{name}={value} must be a positive multiple of {multiple} (VAE x patch); try {nearest}"
        )


def check_positive_int(name: str, value, default=None) -> None:
    """num_inference_steps (and sizes and frames of a model whose rules are not known yet)."""
    if not _is_int(value) or value < 1:
        nearest = max(1, round(value)) if _is_real(value) else None
        raise ValueError(f"{name} must be a positive int, got {value!r}{_fix(nearest, default)}")


def check_frames(num_frames, temporal: int | None, single_frame: bool = False, default=None) -> None:
    """num_frames: 1 for an image model, temporal * k + 1 for a video model (a positive int when unknown)."""
    if single_frame:
        if num_frames != 1 or not _is_int(num_frames):
            raise ValueError(f"num_frames={num_frames!r}: this model makes single images; try 1")
    elif temporal is None:
        check_positive_int("num_frames", num_frames, default)
    elif not _is_int(num_frames) or num_frames < 1 or (num_frames - 1) % temporal:
        t = temporal
        nearest = max(1, int(num_frames - 1) // t * t + 1) if _is_real(num_frames) else default
        raise ValueError(
            f"num_frames={num_frames} must be {t}k+1 (1, {t + 1}, {2 * t + 1}, ...)"
            + (f"; try {nearest}" if nearest is not None else "")
        )


def check_guidance(name: str, value, default=None) -> None:
    """guidance_scale / guidance_scale_2: a finite number >= 0 (a negative scale inverts the guidance)."""
    if not _is_real(value) or value < 0:
        nearest = 0.0 if isinstance(value, (int, float)) and value < 0 else None
        raise ValueError(f"{name}={value!r} must be a finite number >= 0{_fix(nearest, default)}")


def check_positive(name: str, value, default=None) -> None:
    """fps, flow_shift: a finite number > 0."""
    if not _is_real(value) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a finite number > 0{_fix(None, default)}")


def check_image_use(constraints: Constraints, given: bool, model: str) -> None:
    """An image for a model that takes none, or none for one that needs it."""
    if given and constraints.image == "none":
        raise ValueError(f"{model} takes no image: drop image= (--image), or use an image-to-video model")
    if not given and constraints.image == "required":
        raise ValueError(
            f"{model} is image-to-video: pass image= (--image PATH; a PIL image, path, array or tensor)"
        )


def check_not_applicable(model: str, *arguments: tuple[str, object, str]) -> None:
    """Arguments a model does not take, each (name, value, why): a set one (not None) is an error."""
    for name, value, why in arguments:
        if value is not None:
            raise ValueError(f"{name}={value!r} does not apply to {model}: {why}; leave it unset")


def check_output_type(output_type) -> None:
    if output_type not in ("frames", "latents"):
        raise ValueError(f"output_type must be 'frames' or 'latents', got {output_type!r}")


def check_max_sequence_length(value, most: int | None = None) -> None:
    """The text encoder's token count: a positive int, at most `most` where the model has a cap."""
    if most is not None and (not isinstance(value, int) or not 1 <= value <= most):
        raise ValueError(f"max_sequence_length must be an int in [1, {most}], got {value!r}")
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"max_sequence_length must be a positive int, got {value!r}")


def check_latents(latents, shape: tuple[int, ...], layout: str | None = None) -> None:
    """Caller-given latents: the shape this request draws. layout: how a family names its shape, in place of
    'shape {shape}'."""
    if latents is not None and tuple(latents.shape) != shape:
        what = layout or f"shape {shape}"
        raise ValueError(f"latents must have {what} for this request, got {tuple(latents.shape)}")


def _image_extensions() -> tuple[str, ...]:
    try:
        from PIL import Image
    except ImportError:
        return IMAGE_EXTENSIONS
    return tuple(Image.registered_extensions())


def check_image_path(path: str | os.PathLike) -> None:
    """An image given as a path: an existing, readable file with an image extension."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise ValueError(f"image {path} is a directory; pass an image file")
    if not p.is_file():
        raise ValueError(f"image {path}: no such file")
    if p.suffix.lower() not in _image_extensions():
        kind = f"{p.suffix} is not an image extension" if p.suffix else "has no image extension"
        raise ValueError(f"image {path}: {kind}; pass a .png, .jpg or .webp file")
    try:
        with open(p, "rb") as f:
            f.read(1)
    except OSError as e:
        raise ValueError(f"image {path} cannot be read ({e.strerror or e}); check its permissions") from None


def check_output_path(path: str | os.PathLike) -> Path:
    """Where generated frames go: an extension of dit_rt.media.FORMATS whose writer is installed
    (media.check_writer), not a directory, in a folder that exists or can be created, writable. Probed with
    a temporary file that is gone on return; no folder is created."""
    from dit_rt.media import check_writer

    check_writer(path)
    p = Path(path).expanduser()
    if p.is_dir():
        raise ValueError(f"output {path} is a directory; name a file in it, e.g. {p / ('out' + p.suffix)}")
    folder = p.parent
    while not folder.exists() and folder != folder.parent:  # the folder save() would create from
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"output {path}: {folder} is a file, not a folder; choose another path")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        why = e.strerror or e
        raise ValueError(
            f"output {path}: cannot create files in {folder} ({why}); choose a writable folder"
        ) from None
    if p.exists() and not os.access(p, os.W_OK):
        raise ValueError(f"output {path} exists and is not writable; choose another name")
    return p


# ------------------------------------------------------------------------------------------ constraints


def folder_constraints(folder: str | os.PathLike) -> Constraints:
    """A Hub-layout folder's constraints from model_index.json and its pipeline's config files (its pipeline
    class's `folder_constraints(folder, index)`); unknown for a pipeline dit_rt does not run (`load` says
    so)."""
    from dit_rt.loaders import read_model_index
    from dit_rt.pipeline import find_pipeline

    folder = Path(folder)
    index = read_model_index(folder)
    cls = find_pipeline(index.get("_class_name"))
    if cls is None:
        return Constraints()
    return cls.folder_constraints(folder, index)


def _cached_snapshot(repo: str, revision: str | None) -> Path | None:
    """The repo's snapshot folder if its model_index.json is in the local Hub cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(repo, "model_index.json", revision=revision)
    return Path(path).parent if isinstance(path, str) else None


def model_constraints(model: str | os.PathLike, revision: str | None = None) -> Constraints:
    """What `model` (a local folder, catalog alias or Hub repo id) accepts, known without downloading or
    loading: the catalog's entry, the folder's configs, or a cached snapshot's configs; else unknown."""
    from dit_rt.catalog import lookup
    from dit_rt.loaders.hub import REPO_ID, ResolveError, is_local

    if is_local(model):
        return folder_constraints(Path(model).expanduser())
    entry = lookup(str(model))
    if entry is not None:
        return entry.constraints
    if REPO_ID.match(str(model)):
        folder = _cached_snapshot(str(model), revision)
        if folder is not None:
            try:
                return folder_constraints(folder)
            except (ResolveError, OSError):  # a partial snapshot: `load` completes or reports it
                pass
    return Constraints()


def check_generation(
    model: str | os.PathLike,
    revision: str | None = None,
    *,
    height=None,
    width=None,
    num_frames=None,
    num_inference_steps=None,
    guidance_scale=None,
    guidance_scale_2=None,
    flow_shift=None,
    fps=None,
    image=None,
) -> Constraints:
    """Check the arguments of a generation with `model` before it is resolved, downloaded or loaded.

    None means the model's default. `image` may be a path (checked as a file) or an image object. Raises
    ValueError naming the fix; returns the model's constraints.
    """
    from dit_rt.catalog import lookup
    from dit_rt.loaders.hub import is_local

    c = model_constraints(model, revision)
    entry = None if is_local(model) else lookup(str(model))
    d = entry.defaults if entry else None
    check_image_use(c, image is not None, str(model))
    for name, value in (("height", height), ("width", width)):
        if value is not None and c.spatial:
            check_multiple(name, value, c.spatial)
        elif value is not None:
            check_positive_int(name, value)
    if num_frames is not None:
        check_frames(num_frames, c.temporal, c.single_frame, d and d.num_frames)
    if num_inference_steps is not None:
        check_positive_int("num_inference_steps", num_inference_steps, d and d.num_inference_steps)
    if guidance_scale is not None:
        check_guidance("guidance_scale", guidance_scale, d and d.guidance_scale)
    if guidance_scale_2 is not None:
        check_guidance("guidance_scale_2", guidance_scale_2, d and (d.guidance_scale_2 or d.guidance_scale))
    if flow_shift is not None:
        check_positive("flow_shift", flow_shift, d and d.flow_shift)
    if fps is not None:
        check_positive("fps", fps, d and d.fps)
    if isinstance(image, (str, os.PathLike)):
        check_image_path(image)
    return c
