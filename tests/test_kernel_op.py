"""dit_rt.ops.custom.kernel_op: eager calls run the function itself (no custom-op dispatch overhead) or the
kernel registered for the tensors' device; torch.compile sees the registered opaque op."""

import torch

from dit_rt.ops.custom import kernel_op

calls = []


@kernel_op("dit_rt_test::scaled_add", mutates_args=())
def scaled_add(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    calls.append("default")
    return x + alpha * y


@scaled_add.register_fake
def _(x, y, alpha):
    return torch.empty_like(x)


@kernel_op("dit_rt_test::cuda_only", mutates_args=(), device_types="cuda")
def cuda_only(x: torch.Tensor) -> torch.Tensor:
    raise AssertionError("the CUDA implementation must not run for CPU tensors")


@cuda_only.register_kernel("cpu")
def _(x):
    calls.append("cpu")
    return x * 2


@cuda_only.register_fake
def _(x):
    return torch.empty_like(x)


def test_eager_calls_the_function_and_device_kernels():
    calls.clear()
    x, y = torch.randn(3), torch.randn(3)
    assert torch.equal(scaled_add(x, y, 2.0), x + 2.0 * y)
    assert torch.equal(cuda_only(x), x * 2)
    assert calls == ["default", "cpu"]
    assert isinstance(scaled_add.op, torch._library.custom_ops.CustomOpDef)
    assert torch.equal(torch.ops.dit_rt_test.scaled_add(x, y, 2.0), x + 2.0 * y)  # the op itself


def test_compile_traces_the_registered_op():
    seen = []

    def backend(gm, inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    x, y = torch.randn(3), torch.randn(3)
    out = torch.compile(lambda a, b: scaled_add(a, b, 0.5) + 1, backend=backend, fullgraph=True)(x, y)
    torch.testing.assert_close(out, x + 0.5 * y + 1)
    assert any("dit_rt_test.scaled_add" in s for s in seen), seen
