"""First-Block Cache: run block 0, and skip the rest of the stack while block 0's residual barely changes.

As ParaAttention and diffusers' `FirstBlockCacheConfig` describe it: r0 = block0(x) - x is compared with
the r0 of the branch's last fully computed call by relative L1 (mean |r0 - r0_prev| / mean |r0_prev|);
under the threshold the remaining blocks are replaced by their cached residual (out - block0 output of that
last computed call). Needs no per-model coefficients: it works for any model run through a BlockRunner.
With a tuple carry r0 is measured on the stream the model's cache plan names (`residual`); the cached
residual covers every stream.
"""

from __future__ import annotations

import torch
from torch import nn

from dit_rt.cache.base import StepCache, can_reuse, carry_map
from dit_rt.runner import BlockRunner, Carry


class FirstBlockCache(StepCache):
    kind = "fbcache"

    def lead(self, runner: BlockRunner, blocks: nn.ModuleList, x: Carry, args: tuple, kwargs: dict) -> Carry:
        st = self.state()
        h = runner.run(blocks, x, args, kwargs, 0, 1)  # block 0 always runs
        if len(blocks) == 1:
            self.record(st, True)
            self.computing = True
            return h
        r0 = self.stream_of(h) - self.stream_of(x)
        skip = self.threshold > 0 and can_reuse(st, h, r0) and self.rel_l1(r0, st.prev) < self.threshold
        self.record(st, not skip)
        self.computing = not skip
        if skip:
            # r0_prev stays that of the last computed call, so slow drift still triggers a recompute.
            return carry_map(torch.add, h, st.residual)
        out = runner.run(blocks, h, args, kwargs, 1)
        st.prev, st.residual = r0, carry_map(torch.sub, out, h)
        return out
