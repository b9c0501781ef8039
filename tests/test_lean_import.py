"""`import dit_rt` (and its model, pipeline, parallel, cache and offload modules) stays lean: no optional
kernel package, no reference library, no CUDA initialisation."""

import subprocess
import sys

FORBIDDEN = [
    "diffusers",
    "transformers",
    "sageattention",
    "flash_attn_interface",
    "fa3_fwd_interface",
    "tensorrt_llm",
    "triton",
    "imageio",
    "PIL",
]

PROBE = f"""
import sys, torch
before = set(sys.modules)  # whatever torch itself imports is not ours to judge
import dit_rt, dit_rt.ops, dit_rt.runner
import dit_rt.models.wan, dit_rt.models.text, dit_rt.pipelines.wan
import dit_rt.parallel, dit_rt.cache, dit_rt.offload
loaded = [m for m in {FORBIDDEN!r} if m in sys.modules and m not in before]
assert not loaded, f"import dit_rt pulled in optional packages: {{loaded}}"
assert not torch.cuda.is_initialized(), "import dit_rt initialised CUDA"
print("lean")
"""


def test_import_is_lean():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "lean"
