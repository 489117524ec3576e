"""Communities of the filter graph and their assignment to K students (DESIGN.md section 1, steps 4-5)."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import community as community_louvain
import networkx as nx
import torch

ModeFn = Callable[[list[list[int]], list[int], bool, int], list[list[int]]]


def detect_communities(graph: nx.Graph, resolution: float = 0.7, seed: int = 0) -> tuple[dict[int, int], float]:
    """Louvain communities (python-louvain, seeded) and the modularity of the partition found.

    Louvain cannot run on a graph without edges; every filter is then its own community.
    """
    if graph.number_of_edges() == 0:
        return {int(node): i for i, node in enumerate(sorted(graph.nodes))}, 0.0
    found = community_louvain.best_partition(graph, weight="weight", resolution=resolution, random_state=seed)
    return ({int(node): int(c) for node, c in found.items()},
            float(community_louvain.modularity(found, graph, weight="weight")))


def validate_groups(groups: Sequence[Sequence[int]], num_filters: int) -> None:
    """Raise ValueError unless ``groups`` are non-empty, disjoint lists of filter indices in [0, F)."""
    seen: set[int] = set()
    for s, group in enumerate(groups):
        if not isinstance(group, (list, tuple)) or not group:
            raise ValueError(f"partition {s} is empty or not a list")
        for f in group:
            if not isinstance(f, int) or isinstance(f, bool) or not 0 <= f < num_filters:
                raise ValueError(f"partition {s} holds {f!r}, not a filter index in [0, {num_filters})")
            if f in seen:
                raise ValueError(f"filter {f} is in more than one partition (overlap at partition {s})")
            seen.add(f)


def _target_sizes(num_filters: int, num_students: int, capacities: Sequence[float] | None = None) -> list[int]:
    """Filters per student: F * c_i / sum(c) rounded by largest remainder, each at least 1.

    Largest-remainder rounding keeps each size within one filter of its exact share and the
    sum exactly F; a share below one filter is raised to one (taken from the most over-served).
    """
    _check_counts(num_filters, num_students, capacities)
    caps = [1.0] * num_students if capacities is None else [float(c) for c in capacities]
    shares = [num_filters * c / sum(caps) for c in caps]
    sizes = [int(s) for s in shares]
    by_remainder = sorted(range(num_students), key=lambda i: (-(shares[i] - sizes[i]), i))
    for i in by_remainder[:num_filters - sum(sizes)]:
        sizes[i] += 1
    for i in range(num_students):
        if sizes[i] == 0:
            donor = max((j for j in range(num_students) if sizes[j] > 1), key=lambda j: sizes[j] - shares[j])
            sizes[donor] -= 1
            sizes[i] = 1
    return sizes


def _check_counts(num_filters: int, num_students: int, capacities: Sequence[float] | None) -> None:
    if num_students < 1:
        raise ValueError(f"partition.num_students must be at least 1, got {num_students}")
    if num_students > num_filters:
        raise ValueError(f"partition.num_students = {num_students} but the teacher layer has only "
                         f"{num_filters} filters; every student needs at least one")
    if capacities is not None:
        if len(capacities) != num_students:
            raise ValueError(f"partition.capacities has {len(capacities)} entries; give one per student "
                             f"({num_students})")
        if any(not c > 0 for c in capacities):
            raise ValueError(f"partition.capacities must all be positive, got {list(capacities)}")


def _community_lists(communities: dict[int, int], num_filters: int) -> list[list[int]]:
    """Members of each community, largest first (ties: lowest filter first)."""
    if sorted(communities) != list(range(num_filters)):
        raise ValueError(f"communities must name every filter 0..{num_filters - 1} exactly once")
    members: dict[int, list[int]] = {}
    for f in range(num_filters):
        members.setdefault(communities[f], []).append(f)
    return sorted(members.values(), key=lambda g: (-len(g), g[0]))


def _prototype(groups: list[list[int]], sizes: list[int], split_largest: bool, seed: int) -> list[list[int]]:
    """The prototype's rule (step 5): singletons merged, largest group P0 dropped, rest dealt out.

    Groups 1..K go to students 1..K; every further group to the student holding the fewest
    filters. Filters of P0 belong to no student. Capacities are not used. (The prototype's code
    also merges all communities of equal size into one group; DESIGN.md does not, nor does this.)
    """
    num_students = len(sizes)
    singletons = sorted(g[0] for g in groups if len(g) == 1)
    merged = [g for g in groups if len(g) > 1] + ([singletons] if singletons else [])
    rest = sorted(merged, key=lambda g: (-len(g), g[0]))[1:]
    supported = len(rest)
    while split_largest and 0 < len(rest) < num_students and len(rest[0]) > 1:
        largest = rest.pop(0)
        half = len(largest) // 2
        rest = sorted(rest + [largest[:half], largest[half:]], key=lambda g: (-len(g), g[0]))
    if len(rest) < num_students:
        fix = "partition.mode: balanced" if split_largest else \
            "partition.mode: balanced, or partition.split_largest: true"
        raise ValueError(
            f"prototype mode: after dropping the largest group the filter graph has {supported} groups "
            f"({sum(map(len, rest))} filters), so it supports at most {len(rest)} students, not "
            f"{num_students}; use {fix}")
    students = [list(g) for g in rest[:num_students]]
    for group in rest[num_students:]:
        min(students, key=len).extend(group)
    return students


def _balanced(groups: list[list[int]], sizes: list[int], split_largest: bool, seed: int) -> list[list[int]]:
    """Every filter assigned, student i getting exactly ``sizes[i]`` filters.

    Communities are taken largest first. A community goes whole to the least-loaded student
    (lowest load / target) that still has room for it; when no student has room, the student with
    the most room is filled with the community's lowest-numbered filters and the remainder is
    placed by the same rule. Each split fills a student, so there are at most K-1 splits in all.
    """
    students: list[list[int]] = [[] for _ in sizes]
    for group in groups:
        while group:
            room = [size - len(s) for size, s in zip(sizes, students)]
            fits = [i for i in range(len(sizes)) if room[i] >= len(group)]
            if fits:
                target = min(fits, key=lambda i: (len(students[i]) / sizes[i], i))
                students[target].extend(group)
                group = []
            else:
                target = max(range(len(sizes)), key=lambda i: (room[i], -i))
                students[target].extend(group[:room[target]])
                group = group[room[target]:]
    return students


def _random(groups: list[list[int]], sizes: list[int], split_largest: bool, seed: int) -> list[list[int]]:
    """Seeded random filters per student, ignoring the graph (ablation)."""
    order = torch.randperm(sum(sizes), generator=torch.Generator().manual_seed(seed)).tolist()
    return _cut(order, sizes)


def _contiguous(groups: list[list[int]], sizes: list[int], split_largest: bool, seed: int) -> list[list[int]]:
    """Filters 0..F-1 in order, cut into consecutive runs (ablation)."""
    return _cut(list(range(sum(sizes))), sizes)


def _cut(order: list[int], sizes: list[int]) -> list[list[int]]:
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    return [order[bounds[i]:bounds[i + 1]] for i in range(len(sizes))]


PARTITION_MODES: dict[str, ModeFn] = {
    "balanced": _balanced,
    "prototype": _prototype,
    "random": _random,
    "contiguous": _contiguous,
}


def assign_partitions(communities: dict[int, int], num_filters: int, num_students: int, mode: str = "balanced",
                      capacities: list[float] | None = None, split_largest: bool = False,
                      seed: int = 0) -> list[list[int]]:
    """K disjoint, non-empty, sorted lists of filter indices, one per student.

    ``capacities`` (relative, one per student) set the target sizes of the balanced, random and
    contiguous modes; ``split_largest`` only matters in prototype mode.
    """
    if mode not in PARTITION_MODES:
        raise ValueError(f"unknown partition mode {mode!r}; choose one of: {', '.join(PARTITION_MODES)}")
    sizes = _target_sizes(num_filters, num_students, capacities)
    groups = _community_lists(communities, num_filters)
    return [sorted(s) for s in PARTITION_MODES[mode](groups, sizes, split_largest, seed)]
