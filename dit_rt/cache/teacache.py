"""TeaCache: skip a whole transformer evaluation while the timestep-modulated input barely changes.

Rule (Liu et al., "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model", and the
authors' code: github.com/ali-vilab/TeaCache, TeaCache4Wan2.1/teacache_generate.py `teacache_forward` and
TeaCache4FLUX/teacache_flux.py). Per branch, at every call:

    d    = mean |s - s_prev| / mean |s_prev|          s: the measured signal of this call
    acc += poly(d)                                     poly = np.poly1d(coefficients), highest power first
    skip if acc < threshold, else compute and acc = 0

A skipped call returns x + (the residual out - x of the last computed call of the same branch). Calls in
the first `warmup_steps` steps (and the last step, for the standard variant) are always computed. What
is measured is the authors' choice per model and variant:

    Wan, ret_steps=True   s = e0, the [B, 6, D] timestep projection (`tproj`); 5 warm-up steps, no cutoff
    Wan, ret_steps=False  s = e, the [B, D] time embedding (`temb`); 1 warm-up step, last step computed
    FLUX.1                s = the first block's modulated image input; step 0 and the last step computed

The coefficients are those the authors published (same files); FLUX.2-dev's come from NVIDIA's TensorRT-LLM
visual_gen, the only published fit for it. Models without published coefficients (Wan 2.2, Cosmos) need
`coefficients=` passed explicitly, or the model-agnostic First-Block Cache. Where a model's signals
come from is its `cache_plan` (dit_rt.contract.CachePlan): a named runner argument of its first stack,
or a submodule's output; the rule per variant (WAN_RULES, FLUX_RULES below) is named there too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dit_rt.cache.base import StepCache, can_reuse, carry_map
from dit_rt.contract import block_stacks
from dit_rt.ops.codes import Fp8Codes
from dit_rt.runner import BlockRunner, Carry

# (model, ret_steps) -> rescale polynomial, highest power first, as published by the TeaCache authors.
TEACACHE_COEFFICIENTS: dict[tuple[str, bool], tuple[float, ...]] = {
    ("wan2.1-t2v-1.3b", True): (
        -5.21862437e04,
        9.23041404e03,
        -5.28275948e02,
        1.36987616e01,
        -4.99875664e-02,
    ),
    ("wan2.1-t2v-1.3b", False): (
        2.39676752e03,
        -1.31110545e03,
        2.01331979e02,
        -8.29855975e00,
        1.37887774e-01,
    ),
    ("wan2.1-t2v-14b", True): (-3.03318725e05, 4.90537029e04, -2.65530556e03, 5.87365115e01, -3.15583525e-01),
    ("wan2.1-t2v-14b", False): (-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404),
    ("wan2.1-i2v-14b-480p", True): (
        2.57151496e05,
        -3.54229917e04,
        1.40286849e03,
        -1.35890334e01,
        1.32517977e-01,
    ),
    ("wan2.1-i2v-14b-480p", False): (
        -3.02331670e02,
        2.23948934e02,
        -5.25463970e01,
        5.87348440e00,
        -2.01973289e-01,
    ),
    ("wan2.1-i2v-14b-720p", True): (
        8.10705460e03,
        2.13393892e03,
        -3.72934672e02,
        1.66203073e01,
        -4.17769401e-02,
    ),
    ("wan2.1-i2v-14b-720p", False): (-114.36346466, 65.26524496, -18.82220707, 4.91518089, -0.23412683),
    # FLUX.1 has a single variant (no ret-steps fit); it is used whatever ret_steps says.
    ("flux.1-dev", True): (4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01),
    ("flux.1-dev", False): (4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01),
    # FLUX.2-dev: not in the TeaCache authors' repository; NVIDIA published a cubic fit on the same signal
    # (the first double block's modulated image input) with TensorRT-LLM's visual_gen (flux2_pipeline.py).
    # One variant, used whatever ret_steps says, as for FLUX.1.
    ("flux.2-dev", True): (1.04582360e02, -6.87605554e00, -8.61659379e-02, 5.37600252e-02),
    ("flux.2-dev", False): (1.04582360e02, -6.87605554e00, -8.61659379e-02, 5.37600252e-02),
}


@dataclass(frozen=True)
class TeaCacheRule:
    """Which signal is measured and which steps are always computed."""

    signal: str  # a signal name of the model's CachePlan (runner_args or module_outputs)
    warmup_steps: int  # steps 0 .. warmup_steps-1 are always computed
    compute_last: bool  # the final step is always computed


# Per model family: the rule for the ret-steps and the standard variant (authors' settings, see above);
# a model's CachePlan names its family's.
WAN_RULES = {True: TeaCacheRule("tproj", 5, False), False: TeaCacheRule("temb", 1, True)}
FLUX_RULES = {True: TeaCacheRule("modulated", 1, True), False: TeaCacheRule("modulated", 1, True)}


def poly(coefficients: Sequence[float], x: float) -> float:
    """np.poly1d(coefficients)(x): highest power first, by Horner's rule."""
    y = 0.0
    for c in coefficients:
        y = y * x + c
    return y


class TeaCache(StepCache):
    """The TeaCache stack hook for one transformer; `signal(args)` returns this call's measured tensor, or
    None when it is measured inside the first block: that block then always runs, and the decision (and
    the cached residual) covers the rest of the stacks."""

    kind = "teacache"

    def __init__(
        self,
        threshold: float,
        coefficients: Sequence[float],
        rule: TeaCacheRule,
        signal: Callable[[tuple], torch.Tensor],
        handles: Sequence = (),
    ):
        super().__init__(threshold)
        self.coefficients = tuple(float(c) for c in coefficients)
        if not self.coefficients:
            raise ValueError("TeaCache coefficients must be a non-empty list of numbers")
        self.rule = rule
        self.signal = signal
        self._handles = list(handles)

    def always_compute(self) -> bool:
        """The step-position rules; without step information (no cache_step calls) none applies."""
        if self.step is None:
            return False
        if self.step < self.rule.warmup_steps:
            return True
        return self.rule.compute_last and self.num_steps is not None and self.step >= self.num_steps - 1

    def should_compute(self, x: Carry, s: torch.Tensor) -> bool:
        """The decision for this call; updates the branch's accumulator and remembered signal."""
        st = self.state()
        if self.threshold <= 0 or not can_reuse(st, x, s) or self.always_compute():
            compute = True
            st.accumulated = 0.0
        else:
            st.accumulated += poly(self.coefficients, self.rel_l1(s, st.prev))
            compute = st.accumulated >= self.threshold
            if compute:
                st.accumulated = 0.0
        st.prev = s.detach().clone()
        return compute

    def lead(self, runner: BlockRunner, blocks: nn.ModuleList, x: Carry, args: tuple, kwargs: dict) -> Carry:
        st = self.state()
        signal, start = self.signal(args), 0
        if signal is None:  # measured inside the first block (FLUX's modulated input): run it, then decide
            x, start = runner.run(blocks, x, args, kwargs, 0, 1), 1
            signal = self.signal(args)
            if signal is None:  # a CUDA graph replay runs no forward hooks
                raise RuntimeError(
                    "TeaCache measures this model inside its first block, which a CUDA graph replay hides; "
                    "use cache=dict(kind='fbcache') with cuda_graphs=True"
                )
        compute = self.should_compute(x, signal)
        self.record(st, compute)
        self.computing = compute
        if not compute:
            return carry_map(torch.add, x, st.residual)
        out = runner.run(blocks, x, args, kwargs, start)
        st.residual = carry_map(torch.sub, out, x)
        return out

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def teacache_coefficients(model_name: str | None, ret_steps: bool) -> tuple[float, ...]:
    """The authors' published coefficients for a catalog alias; a clear error when there are none."""
    if (model_name, ret_steps) in TEACACHE_COEFFICIENTS:
        return TEACACHE_COEFFICIENTS[(model_name, ret_steps)]
    known = sorted({m for m, _ in TEACACHE_COEFFICIENTS})
    what = f"model {model_name!r}" if model_name else "this model (loaded from a folder, no catalog alias)"
    raise ValueError(
        f"TeaCache has no published coefficients for {what}; known: {', '.join(known)}. Pass your own with "
        "cache=dict(kind='teacache', coefficients=[...]) / --cache-coefficients c4,c3,c2,c1,c0 (np.poly1d "
        "order, highest power first), borrow a known model's with cache=dict(..., model='<alias>') / "
        "--cache-model ALIAS, or use cache=dict(kind='fbcache', threshold=0.1) / --cache fbcache"
    )


def make_teacache(
    model: nn.Module,
    *,
    threshold: float = 0.2,
    ret_steps: bool = True,
    coefficients: Sequence[float] | None = None,
    model_name: str | None = None,
) -> TeaCache:
    """A TeaCache for `model` (not yet installed): its `cache_plan`, the coefficients, signal probes."""
    plan = getattr(model, "cache_plan", None)
    if plan is None or plan.teacache is None:
        raise ValueError(
            f"TeaCache has no plan for {type(model).__name__} (its `cache_plan` declares no TeaCache rules); "
            "use cache=dict(kind='fbcache') / --cache fbcache"
        )
    if coefficients is None:
        coefficients = teacache_coefficients(model_name, bool(ret_steps))
    rule = plan.teacache[bool(ret_steps)]
    handles = []
    if rule.signal in plan.runner_args:
        index = block_stacks(model)[0].spec.arg(plan.runner_args[rule.signal])  # in the args after the carry

        def signal(args: tuple) -> torch.Tensor:
            return args[index]

    else:
        captured: dict[str, torch.Tensor] = {}
        module = model.get_submodule(plan.module_outputs[rule.signal])

        def probe(_module, _inputs, output):
            if isinstance(output, Fp8Codes):  # a modulated input handed to an fp8 GEMM as its codes
                output = output.q.float() * output.scale
            captured["s"] = output

        handles.append(module.register_forward_hook(probe))

        def signal(args: tuple) -> torch.Tensor | None:  # None until the module has run in this call
            return captured.pop("s", None)

    return TeaCache(threshold, coefficients, rule, signal, handles)
