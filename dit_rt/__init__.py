"""dit_rt: a standalone, minimal runtime for diffusion-transformer image and video generation.

pipe = dit_rt.load("wan2.1-t2v-1.3b")          # alias, Hub repo id, or local Hub-layout folder
out = pipe.generate("a cat and a dog baking a cake")
out.save("cake.mp4")
"""

from __future__ import annotations

__version__ = "0.1.0"


def list_models():
    """Every catalog entry (alias, Hub repo, family, task, defaults, implemented)."""
    from dit_rt.catalog import list_models

    return list_models()


def load(model: str, *, revision: str | None = None, **options):
    """Build a pipeline from a catalog alias, a Hub repo id or a local folder in the Hub Diffusers layout.

    Runtime options (`device`, `dtype`, `attention`, `linear`, `vae_dtype`, `parallel`, `cache`, `offload`,
    `compile`, `cuda_graphs`) are validated before any file is read; see README.md for each.
    """
    from dit_rt import loaders
    from dit_rt.catalog import lookup
    from dit_rt.pipeline import find_pipeline, pipeline_names
    from dit_rt.runtime import RuntimeOptions

    opts = RuntimeOptions.create(**options)
    entry = lookup(model)
    if entry is not None and not entry.implemented:
        raise NotImplementedError(
            f"{entry.alias} ({entry.repo}, family {entry.family!r}, task {entry.task!r}) is in the catalog "
            "but not supported by this version of dit_rt yet; `dit-rt models` lists what runs"
        )
    if opts.cache and opts.cache["kind"] == "teacache" and opts.cache.get("coefficients") is None:
        from dit_rt.cache import teacache_coefficients

        # No published coefficients for this model: say so before anything is downloaded or loaded.
        teacache_coefficients(
            opts.cache.get("model", entry.alias if entry else None), opts.cache.get("ret_steps", True)
        )
    folder = loaders.resolve(entry.repo if entry else model, revision=revision or (entry and entry.revision))
    index = loaders.read_model_index(folder)
    name = index.get("_class_name")
    cls = find_pipeline(name)  # the family pipeline registered for it (dit_rt.pipeline.register_pipeline)
    if cls is None:
        raise NotImplementedError(
            f"{folder}: pipeline {name!r} is not supported yet; supported: {', '.join(pipeline_names())}"
        )
    return cls(folder, index, opts, entry)
