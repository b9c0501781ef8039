"""Multi-GPU parallelism on torch.distributed: one device mesh over (dp, cfg, ring, ulysses), Ulysses and
Ring attention installed behind the attention seam, sequence / batch / CFG split helpers, FSDP2.

Models know nothing of ranks: `SequenceParallel.apply(model, mesh)` reads the model's `sequence_plan`,
shards the block runners' inputs stream by stream and swaps the self-attention ops; `shard_blocks` wraps
the blocks in FSDP2. Launch with torchrun (`python tools/launch.py ...` computes --nproc-per-node from the
degrees).
"""

from dit_rt.parallel.fsdp import shard_blocks
from dit_rt.parallel.mesh import ParallelConfig, ParallelMesh, init_distributed
from dit_rt.parallel.ring import merge_partial, ring_attention
from dit_rt.parallel.sequence import (
    Replicate,
    SequenceLayout,
    SequenceParallel,
    SequenceParallelAttention,
    SequencePlan,
    Split,
)
from dit_rt.parallel.split import (
    ShardLayout,
    cfg_gather,
    cfg_select,
    gather_batch,
    gather_sequence,
    gather_streams,
    shard_len,
    shard_sequence,
    shard_streams,
    split_batch,
    split_sizes,
)
from dit_rt.parallel.ulysses import all_to_all, ulysses_attention

__all__ = [
    "ParallelConfig",
    "ParallelMesh",
    "Replicate",
    "SequenceLayout",
    "SequenceParallel",
    "SequenceParallelAttention",
    "SequencePlan",
    "ShardLayout",
    "Split",
    "all_to_all",
    "cfg_gather",
    "cfg_select",
    "gather_batch",
    "gather_sequence",
    "gather_streams",
    "init_distributed",
    "merge_partial",
    "ring_attention",
    "shard_blocks",
    "shard_len",
    "shard_sequence",
    "shard_streams",
    "split_batch",
    "split_sizes",
    "ulysses_attention",
]
