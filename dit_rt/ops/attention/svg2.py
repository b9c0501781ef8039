"""`svg` mode "svg2": Sparse VideoGen 2's semantic-aware permutation (Yang et al., 2025), per call.

Per (batch, head), the queries and the keys are clustered apart by k-means on their vectors (`q_clusters`,
`k_clusters`, `kmeans_iters` Lloyd steps from evenly spaced seeds, fitted on `kmeans_sample` evenly spaced
tokens, then every token labelled by its nearest centroid). The score of a query cluster against a key
cluster is estimated from the centroids, softmax(q_c . k_c * scale + log |key cluster|): the share of a
centroid query's attention mass each key cluster holds. Each query cluster keeps the key clusters of largest
estimated mass, in that order, while their tokens fit `budget` x the keys (at least one). Tokens are then
permuted so that every cluster is contiguous (queries by query cluster, keys and values by key cluster),
which makes the selected (query cluster, key cluster) pairs dense rectangles; all heads run as one
FlexAttention call whose BlockMask lists the blocks any selected pair touches (from cluster-block
incidence, never an N x N matrix), with the exact pair test as its mask_mod inside those blocks, and the
output is permuted back.

The clusters follow what the tokens mean rather than where they sit, so a head that is neither spatial nor
temporal still finds its keys; the price is the clustering on every call. Test-sized here; its speed on a GPU
is for tools/bench_svg.py to measure.
"""

from __future__ import annotations

import torch


def kmeans(x: torch.Tensor, clusters: int, iters: int, sample: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means over the rows of x [G, N, D] per group G, seeded by evenly spaced rows, fp32:
    -> (labels int64 [G, N], centroids [G, k, D]); a cluster left empty keeps its previous centroid.
    sample > 0 (and < N): the centroids are fitted on that many evenly spaced rows and then every row is
    labelled once, so the Lloyd steps cost sample / N of theirs on all rows."""
    G, N, D = x.shape
    fit = x if not 0 < sample < N else x[:, (torch.arange(sample, device=x.device) * N) // sample]
    fit = fit.float()
    n = fit.shape[1]
    k = min(clusters, n)
    centroids = fit[:, (torch.arange(k, device=x.device) * n) // k].clone()  # [G, k, D]
    labels = assign(fit, centroids)
    for _ in range(iters):
        sums = torch.zeros_like(centroids).scatter_add_(1, labels[..., None].expand(-1, -1, D), fit)
        ones = torch.ones_like(labels, dtype=fit.dtype)
        counts = torch.zeros(G, k, device=x.device).scatter_add_(1, labels, ones)
        centroids = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], centroids)
        labels = assign(fit, centroids)
    return (labels if n == N else assign(x, centroids)), centroids


def assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """The nearest centroid of every row: x [G, N, D], centroids [G, k, D] fp32 -> [G, N]. The products run
    in x's dtype (a bf16 GEMM over all tokens), the centroid norms in fp32."""
    dots = (x @ centroids.to(x.dtype).transpose(1, 2)).float()
    return (2 * dots - centroids.square().sum(-1)[:, None]).argmax(-1)


def select(
    cq: torch.Tensor, ck: torch.Tensor, k_sizes: torch.Tensor, scale: float, budget: float, keys: int
) -> torch.Tensor:
    """Key clusters kept per query cluster: centroids cq [G, Kq, D], ck [G, Kk, D], key cluster sizes
    k_sizes [G, Kk] -> bool [G, Kq, Kk]: by estimated attention mass, largest first, while the kept key tokens
    stay within budget x keys (the first one always)."""
    logits = (cq @ ck.transpose(1, 2)) * scale + k_sizes.clamp_min(1).log()[:, None]
    logits = logits.masked_fill(k_sizes[:, None] == 0, float("-inf"))
    order = logits.argsort(dim=-1, descending=True)  # [G, Kq, Kk]
    sizes = k_sizes[:, None].expand_as(order).gather(-1, order)
    before = sizes.cumsum(-1) - sizes  # key tokens kept before each candidate
    keep_sorted = (before + sizes <= budget * keys) | (before == 0)
    keep_sorted &= sizes > 0
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


def _incidence(labels_sorted: torch.Tensor, clusters: int, block: int) -> torch.Tensor:
    """[G, blocks, clusters] float: whether block b of the permuted tokens holds a token of cluster c."""
    G, N = labels_sorted.shape
    n = -(-N // block)
    blocks = (torch.arange(N, device=labels_sorted.device) // block).expand(G, N)
    out = torch.zeros(G, n * clusters, device=labels_sorted.device)
    return out.scatter_(1, blocks * clusters + labels_sorted, 1.0).view(G, n, clusters)


def semantic_block_mask(lq: torch.Tensor, lk: torch.Tensor, keep: torch.Tensor, B: int, H: int, block: int):
    """The FlexAttention BlockMask of kept (query cluster, key cluster) pairs on cluster-sorted tokens: lq /
    lk [G, N] sorted labels (G = B * H), keep [G, Kq, Kk]. Listed blocks are those any kept pair touches;
    inside them mask_mod tests the pair."""
    from torch.nn.attention.flex_attention import BlockMask

    G, N = lq.shape
    aq = _incidence(lq, keep.shape[1], block)  # [G, nq, Kq]
    ak = _incidence(lk, keep.shape[2], block)  # [G, nk, Kk]
    need = (aq @ keep.float() @ ak.transpose(1, 2)) > 0  # [G, nq, nk]
    count = need.sum(-1).to(torch.int32)  # [G, nq]
    # the needed kv block indices first in each row (a stable sort puts True before False)
    idx = (~need).to(torch.int8).argsort(dim=-1, stable=True).to(torch.int32)
    qlab, klab, kept = lq.view(B, H, N), lk.view(B, H, N), keep.view(B, H, *keep.shape[1:])

    def mask_mod(b, h, q_idx, kv_idx):
        return kept[b, h, qlab[b, h, q_idx], klab[b, h, kv_idx]]

    shape = (B, H, *count.shape[1:])
    return BlockMask.from_kv_blocks(
        count.view(shape), idx.view(*shape, -1), BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(N, N)
    )


def semantic_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    budget: float,
    q_clusters: int,
    k_clusters: int,
    iters: int,
    block: int,
    attend,
    sample: int = 0,
) -> tuple[torch.Tensor, dict]:
    """q/k/v [B, N, H, D] -> (out [B, N, H, D], plan): cluster, select, permute, `attend(q, k, v,
    block_mask, scale)` on [B, H, N, D], permute back; `sample`: the k-means fit on that many tokens
    (`kmeans`). plan: labels, kept pairs and permutations (tests)."""
    B, N, H, D = q.shape
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, N, D]
    lq, cq = kmeans(qh.reshape(B * H, N, D), q_clusters, iters, sample)
    lk, ck = kmeans(kh.reshape(B * H, N, D), k_clusters, iters, sample)
    k_sizes = torch.zeros(B * H, ck.shape[1], device=q.device).scatter_add_(
        1, lk, torch.ones_like(lk, dtype=torch.float32)
    )
    keep = select(cq, ck, k_sizes, scale, budget, N)
    pq, pk = lq.argsort(dim=-1, stable=True), lk.argsort(dim=-1, stable=True)  # [G, N]
    lq_s, lk_s = lq.gather(1, pq), lk.gather(1, pk)
    mask = semantic_block_mask(lq_s, lk_s, keep, B, H, block)

    def gather(x, perm):  # [B, H, N, D] along N by perm [G, N]
        return x.gather(2, perm.view(B, H, N, 1).expand(-1, -1, -1, x.shape[-1]))

    o = attend(gather(qh, pq), gather(kh, pk), gather(vh, pk), mask, scale)  # [B, H, N, Dv], sorted queries
    inv = torch.empty_like(pq).scatter_(1, pq, torch.arange(N, device=q.device).expand(B * H, N))
    out = gather(o, inv).transpose(1, 2)  # [B, N, H, Dv]
    return out, dict(lq=lq, lk=lk, keep=keep, pq=pq, pk=pk)
