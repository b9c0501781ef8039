"""Runtime options of `dit_rt.load`, validated up front, and how they are applied to built models."""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


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
    parallel: dict | None = None
    cache: dict | None = None
    offload: str | None = None
    compile: bool = False

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
    ) -> RuntimeOptions:
        """Check every option before anything heavy happens; errors name the valid choices."""
        from dit_rt.ops.attention import attention_names
        from dit_rt.ops.linear import LINEAR_FORMATS

        device = torch.device(
            device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        )
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked for but no CUDA device is visible; pass device='cpu'")
        dtype = _dtype(dtype, "dtype") or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        vae_dtype = _dtype(vae_dtype, "vae_dtype")
        names = attention_names()
        if attention not in names:
            raise ValueError(f"attention={attention!r} is unknown; choose one of: {', '.join(names)}")
        if linear not in LINEAR_FORMATS:
            raise ValueError(f"linear={linear!r} is unknown; choose one of: {', '.join(LINEAR_FORMATS)}")
        if linear != "default" and dtype == torch.float32 and device.type == "cuda":
            raise ValueError(f"linear={linear!r} quantizes bf16/fp16 models; pass dtype=torch.bfloat16")
        for name, value in (("parallel", parallel), ("cache", cache), ("offload", offload)):
            if value:
                raise NotImplementedError(
                    f"{name}= is not available in this version of dit_rt yet; leave it unset"
                )
        if compile not in (True, False):
            raise ValueError(f"compile must be True or False, got {compile!r}")
        if compile:
            raise NotImplementedError("compile=True is not available in this version of dit_rt yet")
        if park_experts not in (None, True, False):
            raise ValueError(
                f"park_experts must be None (decide by free memory), True or False, got {park_experts!r}"
            )
        return cls(
            device, dtype, attention, linear, vae_dtype, park_experts, parallel, cache, offload, compile
        )

    @property
    def linear_format(self) -> str | None:
        return None if self.linear == "default" else self.linear

    def install(self, model: torch.nn.Module) -> None:
        """Apply the attention backend (resolved once, logged once) to a built transformer."""
        from dit_rt.ops.attention import set_attention

        set_attention(model, self.attention, device=self.device, dtype=self.dtype)
