"""The shared denoising loop's contract (dit_rt.pipeline), through a tiny fake family pipeline: registration
by the Hub `_class_name`, both guidance formulas, cfg / dp split semantics on one process, expert switching,
callback order, seeds and output types. The Wan pipelines' own tests check the loop against diffusers."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import dit_rt
from dit_rt import parallel
from dit_rt.offload import ComponentOffload
from dit_rt.parallel.split import split_sizes
from dit_rt.pipeline import (
    GUIDANCE,
    Pipeline,
    Request,
    find_pipeline,
    pipeline_names,
    register_pipeline,
)
from dit_rt.runtime import RuntimeOptions

SHAPE = (3, 2, 4)  # [B, C, L]


def _encode(prompts):
    return torch.tensor([float(len(p)) for p in prompts])


class Denoiser(nn.Module):
    """x -> a*x + prompt value + t/1000: cheap, but every input shows in the output."""

    def __init__(self, a: float):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))

    def forward(self, x, t, prompt):
        return self.a * x + prompt[:, None, None] + t / 1000


class Euler:
    def __init__(self, steps: int):
        self.timesteps = torch.linspace(900, 100, steps)

    def step(self, pred, t, latents):
        return latents - 0.1 * pred


@dataclass
class FakeMesh:
    """One process pretending to be rank `ranks[dim]` of a mesh of `sizes`; groups are None."""

    sizes: dict
    ranks: dict

    def size(self, dim):
        return self.sizes.get(dim, 1)

    def rank(self, dim):
        return self.ranks.get(dim, 0)

    def group(self, dim):
        return None


@register_pipeline("FakeTestPipeline", "FakeTestPipelineToo")
class FakePipeline(Pipeline):
    def __init__(self, folder=None, index=None, options=None, entry=None, *, experts=1, boundary=500.0):
        self.options = options or RuntimeOptions.create(device="cpu", dtype=torch.float32)
        self.mesh, self.device, self.dtype = self.options.mesh, torch.device("cpu"), torch.float32
        self.transformers = [Denoiser(0.5 + 0.25 * i) for i in range(experts)]
        self.offload = ComponentOffload(self.device)
        self.boundary, self.encoded = boundary, []

    @staticmethod
    def folder_constraints(folder, index):
        return None

    def generate(self, prompts, negatives=None, *, guidance=(3.0,), **kw) -> dit_rt.pipeline.GenerationOutput:
        shape = (len(prompts), *SHAPE[1:])
        return self.denoise(Request(prompts, negatives, shape, 4, guidance, {}, **kw))

    def encode_prompt(self, prompts):
        self.encoded.append(list(prompts))
        return _encode(prompts)

    def prepare_latents(self, latents, r):
        return latents, None

    def make_scheduler(self, r):
        return Euler(r.steps)

    def predict(self, model, latents, t, cond):
        return model(latents, t, cond.prompt)

    def expert_index(self, t):
        return 0 if len(self.transformers) == 1 or t >= self.boundary else 1

    def decode_latents(self, latents):
        return latents[:, None, :, :, None].expand(-1, 1, -1, -1, 3).sigmoid()  # [B, 1, C, L, 3]


def _reference(pipe, prompts, negatives, scales, noise, formula, steps=4):
    """The loop written out for one process."""
    x = noise.clone()
    for t in Euler(steps).timesteps:
        i = pipe.expert_index(t)
        model, s = pipe.transformers[i], scales[min(i, len(scales) - 1)]
        c = model(x, t, _encode(prompts))
        if negatives is not None and scales[0] > 1:
            u = model(x, t, _encode(negatives))
            c = GUIDANCE[formula](u, c, s)
        x = x - 0.1 * c
    return x


PROMPTS, NEGATIVES = ["a", "bb", "ccc"], ["dddd", "", "ee"]


def test_registration_by_class_name(tmp_path):
    assert find_pipeline("FakeTestPipeline") is FakePipeline is find_pipeline("FakeTestPipelineToo")
    assert find_pipeline("WanImageToVideoPipeline") is find_pipeline("WanPipeline") is not None
    assert find_pipeline("NoSuchPipeline") is None
    assert {"WanPipeline", "FakeTestPipeline"} <= set(pipeline_names())
    with pytest.raises(ValueError, match="registered twice"):
        register_pipeline("FakeTestPipeline")(type("Other", (Pipeline,), {}))
    # dit_rt.load finds the class by model_index.json's _class_name.
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FakeTestPipeline"}))
    assert isinstance(dit_rt.load(str(tmp_path), device="cpu", dtype=torch.float32), FakePipeline)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "NoSuchPipeline"}))
    with pytest.raises(
        NotImplementedError, match="'NoSuchPipeline' is not supported yet; supported: .*WanPipeline"
    ):
        dit_rt.load(str(tmp_path), device="cpu")


@pytest.mark.parametrize("formula", ["from_uncond", "from_cond"])
def test_guidance_formulas(formula):
    u, c = torch.tensor([1.0]), torch.tensor([3.0])
    assert GUIDANCE[formula](u, c, 2.0).item() == (5.0 if formula == "from_uncond" else 7.0)
    pipe = FakePipeline()
    pipe.guidance = formula
    noise = torch.randn(SHAPE)
    out = pipe.generate(PROMPTS, NEGATIVES, latents=noise, output_type="latents")
    torch.testing.assert_close(out.latents, _reference(pipe, PROMPTS, NEGATIVES, (3.0,), noise, formula))
    assert pipe.encoded == [PROMPTS, NEGATIVES]
    # No unconditional pass without negatives or with a scale <= 1.
    for negatives, scale in ((None, 3.0), (NEGATIVES, 1.0)):
        pipe.encoded = []
        out = pipe.generate(PROMPTS, negatives, guidance=(scale,), latents=noise, output_type="latents")
        assert pipe.encoded == [PROMPTS]
        torch.testing.assert_close(out.latents, _reference(pipe, PROMPTS, None, (scale,), noise, formula))


def test_seed_callback_and_outputs():
    pipe = FakePipeline()
    calls = []
    out = pipe.generate(PROMPTS, NEGATIVES, seed=7, callback=lambda i, t, x: calls.append((i, float(t), x)))
    assert out.seed == 7 and out.metadata["seed"] == 7
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    ref = _reference(pipe, PROMPTS, NEGATIVES, (3.0,), noise, "from_uncond")
    assert [c[:2] for c in calls] == [(i, float(t)) for i, t in enumerate(Euler(4).timesteps)]
    assert torch.equal(calls[-1][2], out.latents)
    torch.testing.assert_close(out.latents, ref)
    assert out.frames.shape == (3, 1, 2, 4, 3) and out.frames.device.type == "cpu"
    torch.testing.assert_close(out.frames, pipe.decode(out.latents))
    drawn = pipe.generate(PROMPTS, NEGATIVES, output_type="latents")
    assert isinstance(drawn.seed, int) and drawn.frames.numel() == 0
    again = pipe.generate(PROMPTS, NEGATIVES, seed=drawn.seed, output_type="latents")
    assert torch.equal(drawn.latents, again.latents)
    assert pipe.generate(PROMPTS, latents=noise, output_type="latents").seed is None


def test_experts_switch_with_their_own_guidance():
    pipe = FakePipeline(experts=2, boundary=500.0)
    noise = torch.randn(SHAPE)
    out = pipe.generate(PROMPTS, NEGATIVES, guidance=(3.0, 2.0), latents=noise, output_type="latents")
    torch.testing.assert_close(
        out.latents, _reference(pipe, PROMPTS, NEGATIVES, (3.0, 2.0), noise, "from_uncond")
    )
    assert [pipe._expert(torch.tensor(t), 3.0, 2.0)[1] for t in (900.0, 100.0)] == [3.0, 2.0]


def test_cfg_parallel_rank_semantics(monkeypatch):
    """cfg=2: rank 0 runs the conditional pass, rank 1 the unconditional one; the predictions are exchanged
    and combined in the same order on both, so both ranks step like one process."""
    noise = torch.randn(SHAPE)
    single = FakePipeline()
    ref = single.generate(PROMPTS, NEGATIVES, latents=noise, output_type="latents").latents
    pipes = [FakePipeline() for _ in range(2)]
    for rank, pipe in enumerate(pipes):
        pipe.mesh = FakeMesh({"cfg": 2}, {"cfg": rank})
    # Stand-ins for the collectives: this rank's branch, and the other rank's prediction recomputed here.
    state = {}

    def cfg_gather(pred, group):
        r = state["rank"]
        theirs = pipes[1 - r].transformers[0](
            state["x"], state["t"], _encode(NEGATIVES if r == 0 else PROMPTS)
        )
        return (pred, theirs) if r == 0 else (theirs, pred)

    monkeypatch.setattr(parallel, "cfg_gather", cfg_gather)
    for r, pipe in enumerate(pipes):
        state["rank"] = r
        monkeypatch.setattr(parallel, "cfg_select", lambda c, u, g, r=r: c if r == 0 else u)

        def predict(model, x, t, cond, orig=pipe.predict):
            state.update(x=x, t=t)
            return orig(model, x, t, cond)

        pipe.predict = predict
        out = pipe.generate(PROMPTS, NEGATIVES, latents=noise, output_type="latents")
        assert pipe.encoded == [PROMPTS if r == 0 else NEGATIVES]  # each rank encodes its own branch only
        torch.testing.assert_close(out.latents, ref)
    with pytest.raises(ValueError, match="parallel cfg=2 .* guidance_scale=1.0 <= 1"):
        pipes[0].generate(PROMPTS, NEGATIVES, guidance=(1.0,), latents=noise)


def test_dp_split_semantics(monkeypatch):
    """dp=2: each group takes its contiguous slice of the prompts and of the whole batch's noise (drawn from
    one seed on every rank), so the gathered batch equals one process's."""
    single = FakePipeline().generate(PROMPTS, NEGATIVES, seed=3, output_type="latents").latents
    parts = []
    for r in range(2):
        sizes = split_sizes(len(PROMPTS), 2)
        start = sum(sizes[:r])
        monkeypatch.setattr(parallel, "split_batch", lambda items, g, s=start, n=sizes[r]: items[s : s + n])
        monkeypatch.setattr(parallel, "gather_batch", lambda x, g, batch: x)  # this group's part only
        pipe = FakePipeline()
        pipe.mesh = FakeMesh({"dp": 2}, {"dp": r})
        out = pipe.generate(PROMPTS, NEGATIVES, seed=3, output_type="latents")
        assert pipe.encoded == [PROMPTS[start : start + sizes[r]], NEGATIVES[start : start + sizes[r]]]
        parts.append(out.latents)
    torch.testing.assert_close(torch.cat(parts), single)
    with pytest.raises(ValueError, match="parallel dp=2 splits the prompt batch"):
        pipe.generate(PROMPTS[:1], NEGATIVES[:1])


def test_components_are_built_by_class_name(tmp_path):
    from dit_rt import components

    index = {"vae": ["diffusers", "AutoencoderKLWan"], "odd": ["diffusers", "AutoencoderKLOdd"]}
    assert components.component_class(index, "vae") == "AutoencoderKLWan"
    assert components.component_class(index, "missing") is None
    assert {"AutoencoderKLWan", "UMT5EncoderModel", "WanTransformer3DModel"} <= set(components._BUILDERS)
    with pytest.raises(NotImplementedError, match="'odd' has class 'AutoencoderKLOdd'.*AutoencoderKLWan"):
        components.build_component(tmp_path, index, "odd", device=torch.device("cpu"), dtype=torch.float32)


def test_loop_looks_up_the_schedule_by_index(monkeypatch):
    """No device sync per step: the scheduler steps by index, the expert is chosen from a host copy of the
    timesteps, and predict's lookups get the step index (`schedule_index`); outside the loop, and after a
    step that raised, lookups take the timestep itself again."""
    seen = {"step": [], "expert": [], "lookup": []}

    class Spy(Euler):
        def step(self, pred, t, latents):
            seen["step"].append(t)
            return super().step(pred, t, latents)

    pipe = FakePipeline(experts=2)
    monkeypatch.setattr(pipe, "make_scheduler", lambda r: Spy(r.steps))
    expert_index, predict = pipe.expert_index, pipe.predict
    monkeypatch.setattr(pipe, "expert_index", lambda t: seen["expert"].append(t) or expert_index(t))

    def spying_predict(model, latents, t, cond):
        seen["lookup"].append(pipe.schedule_index(t))
        return predict(model, latents, t, cond)

    monkeypatch.setattr(pipe, "predict", spying_predict)
    noise = torch.randn(SHAPE)
    out = pipe.generate(PROMPTS, latents=noise, output_type="latents")
    torch.testing.assert_close(out.latents, _reference(pipe, PROMPTS, None, (3.0,), noise, "from_uncond"))
    assert seen["step"] == seen["lookup"] == [0, 1, 2, 3]
    assert all(t.device.type == "cpu" for t in seen["expert"])
    t = torch.tensor(5.0)
    assert pipe.step_index is None and pipe.schedule_index(t) is t

    def failing(model, latents, t, cond):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(pipe, "predict", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        pipe.generate(PROMPTS, latents=noise, output_type="latents")
    assert pipe.step_index is None


def test_on_device_scalar_equals_a_copy():
    pipe = FakePipeline()
    sigma = torch.tensor(0.123456789, dtype=torch.float32)
    for dtype in (torch.float32, torch.bfloat16):
        got = pipe.on_device(sigma, dtype)
        assert got.shape == () and got.dtype == dtype and torch.equal(got, sigma.to(dtype))
