"""The partition stage's files: partition.json (the contract later stages read), the filter graph
as GraphML, and a picture for people (DESIGN.md section 3, run folder)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import networkx as nx
import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from core.io import atomic_path, read_json, write_json_atomic
from partitioning.communities import validate_groups

SCHEMA_VERSION = 1
META_KEYS = ("num_images", "teacher_arch", "teacher_layer", "teacher_sha256", "dataset")
REQUIRED_KEYS = ("schema_version", "mode", "num_students", "partitions", "sizes", "num_filters", "modularity",
                 "num_communities", "num_edges", "params", *META_KEYS)
RERUN = "rerun `nonn partition --force`"


def write_partition(out_dir: Path, groups: Sequence[Sequence[int]], weights: torch.Tensor, graph: nx.Graph,
                    communities: dict[int, int], modularity: float, params: dict, meta: dict) -> dict:
    """Write partition.json, filter_graph.graphml and partition.png into ``out_dir``; return the JSON.

    ``params`` is the config's partition section; ``meta`` must hold :data:`META_KEYS` (the teacher
    checkpoint's sha256 lets later stages notice a partition computed from another teacher).
    """
    missing = [key for key in META_KEYS if key not in meta]
    if missing:
        raise ValueError(f"write_partition: meta lacks {', '.join(missing)}")
    num_filters = int(weights.shape[0])
    partitions = [[int(f) for f in group] for group in groups]
    validate_groups(partitions, num_filters)
    doc = {
        "schema_version": SCHEMA_VERSION,
        "mode": params.get("mode"),
        "num_students": len(partitions),
        "partitions": partitions,
        "sizes": [len(group) for group in partitions],
        "num_filters": num_filters,
        "modularity": float(modularity),
        "num_communities": len(set(communities.values())),
        "num_edges": graph.number_of_edges(),
        "params": params,
        **meta,
    }
    out_dir = Path(out_dir)
    owner = filter_owners(partitions, num_filters)
    _write_graphml(out_dir / "filter_graph.graphml", graph, owner)
    _write_png(out_dir / "partition.png", weights, graph, partitions, owner)
    write_json_atomic(out_dir / "partition.json", doc)  # last: its presence means the stage finished
    return doc


def filter_owners(partitions: list[list[int]], num_filters: int) -> list[int]:
    """Student index holding each filter, -1 for filters no student learns (prototype's P0)."""
    owner = [-1] * num_filters
    for s, group in enumerate(partitions):
        for f in group:
            owner[f] = s
    return owner


def _write_graphml(path: Path, graph: nx.Graph, owner: list[int]) -> None:
    labelled = graph.copy()
    nx.set_node_attributes(labelled, {f: owner[f] for f in labelled.nodes}, "student")
    with atomic_path(path) as tmp:
        nx.write_graphml(labelled, str(tmp))


def _write_png(path: Path, weights: torch.Tensor, graph: nx.Graph, partitions: list[list[int]],
               owner: list[int]) -> None:
    """Left: the graph coloured by student (grey: unassigned). Right: W reordered by partition."""
    fig = Figure(figsize=(13, 6), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    colours = [(0.6, 0.6, 0.6, 1.0) if s < 0 else _student_colour(s, len(partitions)) for s in owner]
    position = _layout(graph)
    nx.draw_networkx_edges(graph, position, ax=left, alpha=0.15, width=0.5)
    nx.draw_networkx_nodes(graph, position, ax=left, node_color=colours, node_size=18, linewidths=0)
    left.set_title(f"filter graph: {graph.number_of_nodes()} filters, {graph.number_of_edges()} edges")
    left.set_axis_off()
    order = [f for group in partitions for f in group] + [f for f, s in enumerate(owner) if s < 0]
    reordered = weights.double()[order][:, order].numpy()
    image = right.imshow(reordered, cmap="viridis", interpolation="nearest")
    for bound in np.cumsum([len(group) for group in partitions]):
        if bound < len(owner):
            right.axhline(bound - 0.5, color="white", linewidth=0.8)
            right.axvline(bound - 0.5, color="white", linewidth=0.8)
    right.set_title("edge weights, filters ordered by student")
    fig.colorbar(image, ax=right, shrink=0.8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def _layout(graph: nx.Graph) -> dict:
    """Seeded spring layout; from 500 nodes on networkx needs scipy for it, and without scipy the
    numpy-only ForceAtlas2 layout (also force-directed) stands in."""
    try:
        return nx.spring_layout(graph, seed=0, weight="weight")
    except ImportError:
        return nx.forceatlas2_layout(graph, seed=0, weight="weight", max_iter=30)


def _student_colour(student: int, num_students: int) -> tuple[float, float, float, float]:
    palette = colormaps["tab10" if num_students <= 10 else "tab20"]
    return palette(student % palette.N)


def read_partition(path: Path, teacher_sha256: str | None = None, num_filters: int | None = None) -> dict:
    """Load partition.json and check it can be used: one-line errors naming the file and the fix.

    ``teacher_sha256`` and ``num_filters``, when given, must match the teacher at hand.
    """
    doc = read_json(path, "partition written by `nonn partition`")
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: not a partition file (top level is not an object); {RERUN}")
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version {doc.get('schema_version')!r}, this code reads "
                         f"{SCHEMA_VERSION}; {RERUN}")
    missing = [key for key in REQUIRED_KEYS if key not in doc]
    if missing:
        raise ValueError(f"{path}: missing keys {', '.join(missing)}; {RERUN}")
    try:
        if not isinstance(doc["num_filters"], int) or doc["num_filters"] < 1:
            raise ValueError(f"num_filters is {doc['num_filters']!r}")
        validate_groups(doc["partitions"], doc["num_filters"])
    except ValueError as e:
        raise ValueError(f"{path}: invalid partitions ({e}); {RERUN}") from e
    if doc["sizes"] != [len(g) for g in doc["partitions"]] or doc["num_students"] != len(doc["partitions"]):
        raise ValueError(f"{path}: sizes/num_students disagree with the partitions; {RERUN}")
    if num_filters is not None and doc["num_filters"] != num_filters:
        raise ValueError(f"{path}: computed for {doc['num_filters']} teacher filters but the teacher has "
                         f"{num_filters}; {RERUN}")
    if teacher_sha256 is not None and doc["teacher_sha256"] != teacher_sha256:
        raise ValueError(f"{path}: partition.json was computed from a different teacher checkpoint (sha256 "
                         f"{str(doc['teacher_sha256'])[:12]}..., teacher now {teacher_sha256[:12]}...); {RERUN}")
    return doc
