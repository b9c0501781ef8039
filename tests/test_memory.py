"""The memory check before loading (dit_rt.memory): sizes from safetensors headers, per option, and the error
that names what would fit, raised before any weight is read."""

import json

import pytest
import torch

from dit_rt import memory
from dit_rt.demo import save_safetensors
from dit_rt.runtime import RuntimeOptions

MiB = 2**20


def _folder(tmp_path):
    """transformer: 4 blocks of one 1024x1024 linear + a 1024x64 input projection; text_encoder: 2 layers of
    512x1024; vae: one conv. Stored float32; sizes below are for bf16 loads."""
    tr = {f"transformer_blocks.{i}.ff.weight": torch.zeros(1024, 1024) for i in range(4)}
    tr |= {f"transformer_blocks.{i}.norm.weight": torch.zeros(1024) for i in range(4)}
    tr["proj_in.weight"] = torch.zeros(1024, 64)
    te = {f"model.layers.{i}.mlp.weight": torch.zeros(512, 1024) for i in range(2)}
    vae = {"decoder.conv_in.weight": torch.zeros(64, 16, 3, 3)}
    for name, state in (("transformer", tr), ("text_encoder", te), ("vae", vae)):
        (tmp_path / name).mkdir()
        save_safetensors(state, tmp_path / name / "diffusion_pytorch_model.safetensors")
    (tmp_path / "tokenizer").mkdir()
    index = {"_class_name": "X", "transformer": ["diffusers", "A"], "text_encoder": ["transformers", "B"]}
    index |= {"vae": ["diffusers", "C"], "tokenizer": ["transformers", "D"]}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    return tmp_path, ["transformer", "text_encoder", "vae", "tokenizer"]


def test_sizes_per_option(tmp_path):
    folder, comps = _folder(tmp_path)
    blk = 1024 * 1024 * 2 + 1024 * 2  # one block in bf16
    tr, te, vae = 4 * blk + 1024 * 64 * 2, 2 * 512 * 1024 * 2, 64 * 16 * 9 * 2
    peak, sizes = memory.weights_on_gpu(folder, comps, torch.bfloat16)
    assert sizes == {"transformer": tr, "text_encoder": te, "vae": vae} and peak == tr + te + vae
    peak, sizes = memory.weights_on_gpu(folder, comps, torch.bfloat16, linear="fp8-per-tensor")
    assert sizes["transformer"] == 4 * (1024 * 1024 + 1024 * 2) + 1024 * 64 * 2  # block linears 1 byte
    assert sizes["text_encoder"] == te  # not a quantized component by default
    assert memory.weights_on_gpu(folder, comps, torch.bfloat16, offload="model")[0] == tr
    peak, sizes = memory.weights_on_gpu(folder, comps, torch.bfloat16, offload="block")
    assert sizes["transformer"] == 2 * blk + 1024 * 64 * 2 and peak == max(sizes.values())
    peak, _ = memory.weights_on_gpu(
        folder, comps, torch.bfloat16, linear="nvfp4", quantized=("transformer", "text_encoder")
    )
    assert peak == 4 * (1024 * 512 + 1024 * 2) + 1024 * 64 * 2 + 512 * 1024 + vae


def test_resident_blocks_are_counted(tmp_path):
    folder, comps = _folder(tmp_path)
    blk, proj, te = 1024 * 1024 * 2 + 1024 * 2, 1024 * 64 * 2, 2 * 512 * 1024 * 2
    kw = dict(offload="block", streamed=("transformer", "text_encoder"))
    _, sizes = memory.weights_on_gpu(folder, comps, torch.bfloat16, **kw)
    peak, kept = memory.weights_on_gpu(folder, comps, torch.bfloat16, resident=blk, **kw)
    assert kept["transformer"] == sizes["transformer"] + blk and kept["text_encoder"] == sizes["text_encoder"]
    # the kept block stays on the GPU while the streamed text encoder runs
    assert peak == max(kept["transformer"], sizes["text_encoder"] + blk, sizes["vae"] + blk)
    _, all_kept = memory.weights_on_gpu(folder, comps, torch.bfloat16, resident=100 * blk, **kw)
    assert all_kept["transformer"] == 2 * blk + proj + 4 * blk  # capped at the blocks there are
    assert te == all_kept["text_encoder"]
    opts = RuntimeOptions.create(
        device="cpu", dtype=torch.bfloat16, offload=dict(name="block", resident_gib=1)
    )
    card = memory.RESERVE + 3 * blk + proj + 1024
    with pytest.raises(MemoryError) as e:
        memory.check_fits(folder, comps, opts, name="tiny", available=card, host_available=2**40)
    assert "offload='block' with resident_gib=1 (GiB" in str(e.value)
    assert "offload='block' without resident_gib (~" in str(e.value)


def test_auto_resident_keeps_what_the_card_holds(tmp_path, caplog):
    import logging

    from dit_rt.runtime import AUTO_RESIDENT

    folder, comps = _folder(tmp_path)
    blk, proj = 1024 * 1024 * 2 + 1024 * 2, 1024 * 64 * 2

    def options():
        opts = RuntimeOptions.create(
            device="cpu", dtype=torch.bfloat16, offload=dict(name="block", resident_gib="auto")
        )
        assert opts.offload_resident == AUTO_RESIDENT
        return opts

    streamed = 2 * blk + proj  # the transformer's non-block part and two slots
    for room, kept in ((streamed + blk + blk // 2, blk + blk // 2), (10 * blk, 4 * blk), (streamed, 0)):
        opts = options()
        card = memory.RESERVE + memory.AUTO_MARGIN + room
        with caplog.at_level(logging.INFO, logger="dit_rt"):
            memory.check_fits(folder, comps, opts, name="tiny", available=card, host_available=2**40)
        assert opts.offload_resident == kept  # bytes; offload keeps the whole blocks within them
        assert f"{kept / memory.GiB:.1f} GiB of leading blocks" in caplog.text
    opts = options()  # a pipeline's own margin (videos: their VAE decode) keeps fewer blocks
    card = memory.RESERVE + memory.AUTO_MARGIN + 10 * blk
    memory.check_fits(
        folder, comps, opts, name="tiny", available=card, host_available=2**40, auto_margin=2**40
    )
    assert opts.offload_resident == 0
    # with no card to size against (CPU), nothing is kept
    opts = options()
    memory.check_fits(folder, comps, opts, name="tiny")
    assert opts.offload_resident == 0


def test_error_names_the_options_that_fit(tmp_path):
    folder, comps = _folder(tmp_path)
    opts = RuntimeOptions.create(device="cpu", dtype=torch.bfloat16)
    tr = 4 * (1024 * 1024 * 2 + 1024 * 2) + 1024 * 64 * 2
    # room for the transformer alone (offload="model"), not for everything; fp8 would fit too
    available = memory.RESERVE + tr + 64 * 1024
    with pytest.raises(MemoryError) as e:
        memory.check_fits(folder, comps, opts, name="tiny", available=available)
    msg = str(e.value)
    assert "tiny needs ~" in msg and "(GiB: transformer 0.0, text_encoder 0.0, vae 0.0)" in msg
    assert "linear='fp8-per-tensor' (~" in msg and "offload='model' (~" in msg and "offload='block' (~" in msg
    assert "GiB; with resident_gib='auto' as many blocks as fit stay on the card)" in msg
    memory.check_fits(folder, comps, opts, name="tiny", available=memory.RESERVE + 16 * MiB)  # fits: no error
    with pytest.raises(MemoryError, match="no single option fits"):
        memory.check_fits(folder, comps, opts, name="tiny", available=memory.RESERVE + 1024)
    memory.check_fits(folder, comps, opts, name="tiny")  # CPU: nothing to check


def test_offload_checks_the_host_too(tmp_path):
    """Offloaded weights are page-locked on the host: a host too small for them is an error before loading."""
    folder, comps = _folder(tmp_path)
    opts = RuntimeOptions.create(device="cpu", dtype=torch.bfloat16, offload="block")
    total = memory.weights_on_gpu(folder, comps, torch.bfloat16)[0]
    card = memory.RESERVE + 16 * MiB
    memory.check_fits(
        folder, comps, opts, name="tiny", available=card, host_available=memory.HOST_RESERVE + total
    )
    with pytest.raises(MemoryError) as e:
        memory.check_fits(
            folder, comps, opts, name="tiny", available=card, host_available=memory.HOST_RESERVE + total - 1
        )
    assert "offload='block' keeps ~0.0 GiB of weights in page-locked host memory" in str(e.value)
    assert "use linear='fp8-per-tensor' with the offload" in str(e.value)
    fp8 = RuntimeOptions.create(device="cpu", dtype=torch.bfloat16, offload="model", linear="fp8-per-tensor")
    with pytest.raises(MemoryError, match="use a host with more memory, or parallel="):
        memory.check_fits(folder, comps, fp8, name="tiny", available=card, host_available=1024)
    # without offload the host is not asked; the real MemAvailable reads as a positive number here
    plain = RuntimeOptions.create(device="cpu", dtype=torch.bfloat16)
    memory.check_fits(folder, comps, plain, name="tiny", available=card, host_available=1024)
    assert memory.host_available_bytes() > 0


def test_host_memory_reads_meminfo_and_the_container_limit(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       131072000 kB\nMemAvailable:   100000000 kB\n")
    limit, usage = tmp_path / "memory.max", tmp_path / "memory.current"
    monkeypatch.setattr(memory, "MEMINFO", str(meminfo))
    monkeypatch.setattr(memory, "CGROUP_FILES", ((str(limit), str(usage)),))
    assert memory.host_available_bytes() == 100000000 * 1024  # no cgroup files: MemAvailable
    limit.write_text("max\n")
    usage.write_text("5000\n")
    assert memory.host_available_bytes() == 100000000 * 1024  # cgroup v2 without a limit
    limit.write_text(f"{64 * 2**30}\n")
    usage.write_text(f"{10 * 2**30}\n")
    assert memory.host_available_bytes() == 54 * 2**30  # a container's 64 GiB limit, 10 used
    monkeypatch.setattr(memory, "MEMINFO", str(tmp_path / "none"))
    assert memory.host_available_bytes() == 54 * 2**30
    monkeypatch.setattr(memory, "CGROUP_FILES", ())
    assert memory.host_available_bytes() is None


def test_load_checks_before_reading_weights(monkeypatch):
    """dit_rt.load raises the MemoryError from the pipeline's start(), before any component is built."""
    import dit_rt
    from dit_rt import components
    from dit_rt.demo import tiny_wan_folder

    folder = tiny_wan_folder()
    real = memory.check_fits
    seen = {}

    def small_card(folder, comps, options, **kw):
        seen.update(kw)
        return real(folder, comps, options, **(kw | dict(available=memory.RESERVE + 1024)))

    def no_build(*a, **k):
        raise AssertionError("a component was built before the memory check")

    monkeypatch.setattr(memory, "check_fits", small_card)
    monkeypatch.setattr(components, "build_component", no_build)
    with pytest.raises(MemoryError, match="needs ~.* GiB of weights"):
        dit_rt.load(str(folder), device="cpu")
    assert seen["quantized"] == ("transformer", "transformer_2")
