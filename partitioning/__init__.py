"""Teacher filters -> K student partitions (DESIGN.md section 1, steps 2-5).

activations (pooled final feature map) -> filter graph (an edge rule, sparsified) -> Louvain
communities -> K disjoint filter lists, one per student; ``artifacts`` writes and checks the
stage's files. :func:`compute_partition` chains the pure steps under one config section.
"""
from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch

from partitioning.activations import POOLINGS, collect_activations
from partitioning.artifacts import SCHEMA_VERSION, read_partition, write_partition
from partitioning.communities import PARTITION_MODES, assign_partitions, detect_communities, validate_groups
from partitioning.graph import EDGE_RULES, build_filter_graph, reference_activation_hub, to_networkx

__all__ = [
    "EDGE_RULES", "PARTITION_MODES", "POOLINGS", "SCHEMA_VERSION", "PartitionResult", "assign_partitions",
    "build_filter_graph", "collect_activations", "compute_partition", "detect_communities", "read_partition",
    "reference_activation_hub", "to_networkx", "validate_groups", "write_partition",
]


@dataclass
class PartitionResult:
    groups: list[list[int]]
    weights: torch.Tensor
    graph: nx.Graph
    communities: dict[int, int]
    modularity: float


def compute_partition(acts: torch.Tensor, cfg: dict, seed: int) -> PartitionResult:
    """Activations [N, F] -> K partitions, using the keys of the config's ``partition`` section.

    ``cfg`` is that section; the whole config is accepted too (its ``partition`` section is used).
    """
    section = cfg.get("partition", cfg)
    weights = build_filter_graph(acts, section["edge_rule"], section["top_k"], section["percentile"])
    graph = to_networkx(weights)
    communities, modularity = detect_communities(graph, section["resolution"], seed)
    groups = assign_partitions(communities, weights.shape[0], section["num_students"], section["mode"],
                               section["capacities"], section["split_largest"], seed)
    return PartitionResult(groups, weights, graph, communities, modularity)
