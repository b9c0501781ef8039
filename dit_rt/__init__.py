"""dit_rt: a standalone, minimal runtime for diffusion-transformer image and video generation."""

__version__ = "0.1.0"
