"""`kernel_op`: a torch.library custom op that eager code calls without the dispatcher's Python layer.

The fused kernels are custom ops so torch.compile treats them as opaque calls with a fake (shape-only)
implementation. In eager mode the custom-op wrapper costs ~0.2 ms of host time per call (autograd and
dynamo-disable layers in Python), which is more than many of these kernels take on the GPU: an eager FLUX.1
fp8 forward makes ~800 such calls and was host-bound at 3.7x its GPU time. The decorated function is
therefore called directly unless torch.compile is tracing, where the registered op is used.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch


def kernel_op(name: str, *, mutates_args: Iterable[str] | str = (), device_types: str | None = None):
    """Decorator: register fn as the custom op `name` (torch.library.custom_op) and return a callable that
    runs fn directly in eager mode and the op under torch.compile. `.op` is the op; `.register_fake`
    and `.register_kernel(device_type)` register on it (the latter also for eager calls on that device)."""

    def wrap(fn: Callable) -> Callable:
        op = torch.library.custom_op(name, mutates_args=mutates_args, device_types=device_types)(fn)
        kernels: dict[str, Callable] = {}  # other devices' implementations (register_kernel)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            if torch.compiler.is_compiling():
                return op(*args, **kwargs)
            if kernels:
                t = next((a for a in args if isinstance(a, torch.Tensor)), None)
                if t is not None and t.device.type in kernels:
                    return kernels[t.device.type](*args, **kwargs)
            return fn(*args, **kwargs)

        def register_kernel(device_type: str):
            def register(impl: Callable) -> Callable:
                op.register_kernel(device_type)(impl)
                kernels[device_type] = impl
                return impl

            return register

        call.op = op
        call.register_fake = op.register_fake
        call.register_kernel = register_kernel
        return call

    return wrap
