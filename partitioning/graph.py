"""Filter activation network: which teacher filters fire together (DESIGN.md section 1, step 3).

Every edge rule maps activations [N, F] to raw pair weights [F, F]; :func:`build_filter_graph`
then applies the prototype's post-processing (zero diagonal, W /= max W, keep only entries at or
above the p-th percentile of the non-zero entries).

Top-k sets are defined exactly: the k largest normalised activations of an image, ties broken in
favour of the lower filter index. Both the batched rules and :func:`reference_activation_hub` use
this definition, so they agree to rounding even on tied activations.
"""
from __future__ import annotations

from collections.abc import Callable

import networkx as nx
import numpy as np
import torch

EdgeRule = Callable[[torch.Tensor, int, int], torch.Tensor]
PairWeight = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _top_k(acts: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised values â (float64) and filter indices [c, k] of each image's top-k set.

    The set is chosen on the raw activations (dividing by the row's maximum keeps the order), so
    only k values per image are converted and normalised. Negatives are clipped to 0 as in the
    prototype; images with no positive activation get all zeros and so add nothing.
    ``torch.topk`` leaves ties at the k-th value unspecified, so rows with such a tie are redone
    to favour the lower index. Ties at 0 are left alone: a filter at 0 adds nothing either way.
    """
    values, index = acts.topk(k, dim=1)
    kth = values[:, -1:]
    tied = ((acts >= kth).sum(dim=1) > k) & (kth[:, 0] > 0)
    if tied.any():
        rows = tied.nonzero()[:, 0]
        index[rows] = _lowest_index_top_k(acts[rows], kth[rows], k)
    peak = values[:, :1].double()
    top = acts.gather(1, index).double().clamp_min_(0.0)
    return top.div_(torch.where(peak > 0, peak, torch.inf)), index


def _lowest_index_top_k(acts: torch.Tensor, kth: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the top-k set when the k-th value is shared: those above it, then the lowest tied."""
    above = acts > kth
    at = acts == kth
    chosen = above | (at & (at.cumsum(dim=1) <= k - above.sum(dim=1, keepdim=True)))
    return chosen.nonzero()[:, 1].view(-1, k)  # row-major: exactly k per row, rows in order


def _top_k_pair_sum(acts: torch.Tensor, top_k: int, chunk: int, pair_weight: PairWeight) -> torch.Tensor:
    """W_ij = sum_n pair_weight(â_i, â_j) over images n with i and j both in T_n.

    Each image's k x k pair weights are formed by broadcasting and scatter-added into W, so the
    cost is O(N k^2) whatever the number of filters F, and memory O(chunk k^2 + F^2). Broadcasting
    all k^2 ordered pairs measured faster than gathering the k(k-1)/2 unordered ones; the upper
    triangle is then mirrored, which makes W exactly symmetric and drops the i = j terms.
    """
    num_filters = acts.shape[1]
    k = min(top_k, num_filters)
    flat = torch.zeros(num_filters * num_filters, dtype=torch.float64)
    for start in range(0, acts.shape[0], chunk):
        values, index = _top_k(acts[start:start + chunk], k)
        weights = pair_weight(values[:, :, None], values[:, None, :])
        cells = index[:, :, None] * num_filters + index[:, None, :]
        flat.index_add_(0, cells.view(-1), weights.reshape(-1))
    upper = flat.view(num_filters, num_filters).triu(diagonal=1)
    return upper + upper.T


def activation_hub(acts: torch.Tensor, top_k: int, chunk: int) -> torch.Tensor:
    """The prototype's rule: â_i â_j |â_i - â_j| for pairs in the same top-k set."""
    return _top_k_pair_sum(acts, top_k, chunk, lambda a, b: (a - b).abs_().mul_(a).mul_(b))


def coactivation(acts: torch.Tensor, top_k: int, chunk: int) -> torch.Tensor:
    """Plain co-activation â_i â_j for pairs in the same top-k set (ablation)."""
    return _top_k_pair_sum(acts, top_k, chunk, torch.mul)


def pearson(acts: torch.Tensor, top_k: int, chunk: int) -> torch.Tensor:
    """Pearson correlation of filters across images, negatives clipped to 0 (ablation; no top-k).

    Accumulated chunk by chunk in float64 so no [N, F] float64 copy is ever made; filters with
    zero variance correlate with nothing.
    """
    num_images, num_filters = acts.shape
    mean = acts.sum(dim=0, dtype=torch.float64) / max(num_images, 1)
    scatter = torch.zeros(num_filters, num_filters, dtype=torch.float64)
    for start in range(0, num_images, chunk):
        centred = acts[start:start + chunk].double() - mean
        scatter += centred.T @ centred
    std = scatter.diagonal().sqrt()
    scale = torch.outer(std, std)
    corr = torch.where(scale > 0, scatter / scale.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    return corr.clamp_min(0.0)


EDGE_RULES: dict[str, EdgeRule] = {
    "activation_hub": activation_hub,
    "coactivation": coactivation,
    "pearson": pearson,
}


def _sparsify(weights: torch.Tensor, percentile: float) -> torch.Tensor:
    """Zero diagonal, scale to max 1, keep entries >= the percentile of the non-zero entries."""
    weights = weights.clone()
    weights.fill_diagonal_(0.0)
    peak = weights.max()
    if peak > 0:
        weights /= peak
    nonzero = weights[weights > 0]
    if nonzero.numel():
        threshold = float(np.percentile(nonzero.numpy(), percentile))
        weights[weights < threshold] = 0.0
    return weights


def build_filter_graph(acts: torch.Tensor, rule: str = "activation_hub", top_k: int = 50,
                       percentile: float = 99.0, chunk: int = 1024) -> torch.Tensor:
    """Symmetric float64 [F, F] edge weights with zero diagonal from activations [N, F].

    ``chunk`` images are processed at a time; 1,024 (about 20 MB per pair tensor at k = 50)
    measured fastest on a 2-core CPU.
    """
    if rule not in EDGE_RULES:
        raise ValueError(f"unknown edge rule {rule!r}; choose one of: {', '.join(EDGE_RULES)}")
    if acts.dim() != 2:
        raise ValueError(f"activations must be [images, filters], got shape {tuple(acts.shape)}")
    if top_k < 1 or chunk < 1:
        raise ValueError(f"top_k and chunk must be positive, got top_k={top_k}, chunk={chunk}")
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    return _sparsify(EDGE_RULES[rule](acts.detach().cpu(), top_k, chunk), percentile)


def reference_activation_hub(acts: torch.Tensor, top_k: int = 50, percentile: float = 99.0) -> torch.Tensor:
    """The prototype's per-image, per-pair loop over numpy scalars: the baseline for tests and benchmarks.

    Mirrors ``ActivationNetwork.create_activation_network`` of SLDGroup/NoNN_framework, except that
    ties go to the lower filter index (stable sort) and each product is taken in the same order as
    the batched rule, so that both agree to the last bit wherever summation order allows.
    """
    rows = acts.double().clamp_min(0.0).numpy()
    num_filters = rows.shape[1]
    weights = np.zeros((num_filters, num_filters))
    for row in rows:
        peak = row.max()
        if peak <= 0:
            continue
        a_hat = row / peak
        top = np.argsort(-a_hat, kind="stable")[:top_k]
        for x in range(len(top)):
            for y in range(x + 1, len(top)):
                i, j = min(top[x], top[y]), max(top[x], top[y])
                weights[i, j] += abs(a_hat[i] - a_hat[j]) * a_hat[i] * a_hat[j]
                weights[j, i] = weights[i, j]
    return _sparsify(torch.from_numpy(weights), percentile)


def to_networkx(weights: torch.Tensor) -> nx.Graph:
    """Undirected graph with all F filters as nodes 0..F-1 and one weighted edge per non-zero pair."""
    graph = nx.Graph()
    graph.add_nodes_from(range(weights.shape[0]))
    rows, cols = torch.triu(weights, diagonal=1).nonzero(as_tuple=True)
    values = weights[rows, cols].tolist()
    graph.add_weighted_edges_from(zip(rows.tolist(), cols.tolist(), values), weight="weight")
    return graph
