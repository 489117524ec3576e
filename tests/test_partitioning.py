"""partitioning/: filter graph against the prototype's loop, communities, modes, files, activations."""
from __future__ import annotations

import json
from math import comb
from pathlib import Path

import networkx as nx
import pytest
import torch

from partitioning import (
    PARTITION_MODES,
    assign_partitions,
    build_filter_graph,
    collect_activations,
    compute_partition,
    detect_communities,
    read_partition,
    reference_activation_hub,
    to_networkx,
    write_partition,
)
from partitioning.artifacts import filter_owners
from pipeline.config import DEFAULTS
from students.registry import build_model

GROUPS, GROUP_SIZE = 4, 16
F = GROUPS * GROUP_SIZE
PLANTED = [f // GROUP_SIZE for f in range(F)]
SHA = "ab" * 32


def planted_activations(num_images: int = 600, seed: int = 0) -> torch.Tensor:
    """Each image lights one or two of 4 groups of 16 filters strongly; everything else is noise."""
    g = torch.Generator().manual_seed(seed)
    acts = 0.1 * torch.rand(num_images, F, generator=g)
    first = torch.randint(0, GROUPS, (num_images,), generator=g)
    second = torch.where(torch.rand(num_images, generator=g) < 0.5,
                         torch.randint(0, GROUPS, (num_images,), generator=g), first)
    group_of = torch.tensor(PLANTED)
    lit = (group_of == first[:, None]) | (group_of == second[:, None])
    return acts + lit * (0.3 + 0.7 * torch.rand(num_images, F, generator=g))


def partition_cfg(**overrides) -> dict:
    return {**DEFAULTS["partition"], "num_students": 4, "top_k": 20, "percentile": 80.0, **overrides}


def adjusted_rand_index(a: list[int], b: list[int]) -> float:
    def pairs(counts: dict) -> int:
        return sum(comb(c, 2) for c in counts.values())

    def count(items) -> dict:
        out: dict = {}
        for item in items:
            out[item] = out.get(item, 0) + 1
        return out

    joint, sa, sb = pairs(count(zip(a, b))), pairs(count(a)), pairs(count(b))
    expected = sa * sb / comb(len(a), 2)
    return (joint - expected) / ((sa + sb) / 2 - expected)




def loop_coactivation(acts: torch.Tensor, top_k: int) -> torch.Tensor:
    """Raw co-activation sum, pair by pair (same top-k definition: ties to the lower index)."""
    f = acts.shape[1]
    w = torch.zeros(f, f, dtype=torch.float64)
    for row in acts.double():
        if row.max() <= 0:
            continue
        a = row / row.max()
        top = sorted(range(f), key=lambda i: -a[i].item())[:top_k]
        for i in top:
            for j in top:
                if i != j:
                    w[i, j] += a[i] * a[j]
    return w


def sparsified(raw: torch.Tensor, percentile: float) -> torch.Tensor:
    w = raw / raw.max()
    threshold = torch.quantile(w[w > 0], percentile / 100)
    return torch.where(w >= threshold, w, 0.0)


# --- filter graph ---------------------------------------------------------------------------

def _random_acts() -> torch.Tensor:
    return torch.rand(40, 24, generator=torch.Generator().manual_seed(1))


def _tied_acts() -> torch.Tensor:
    """Few distinct values (ties across the top-k boundary), zero filters and all-zero images."""
    acts = torch.randint(0, 4, (40, 24), generator=torch.Generator().manual_seed(2)).float() / 3
    acts[::7] = 0.0
    acts[:, 5] = 0.0
    return acts


def _signed_acts() -> torch.Tensor:
    """Negative activations are clipped to 0 first, as in the prototype."""
    return torch.randn(40, 24, generator=torch.Generator().manual_seed(3))


def _sparse_acts() -> torch.Tensor:
    """Mostly zeros, so many images have fewer than k active filters (ties at 0 in the top-k)."""
    g = torch.Generator().manual_seed(4)
    return torch.rand(40, 24, generator=g) * (torch.rand(40, 24, generator=g) < 0.3)


@pytest.mark.parametrize("make_acts", [_random_acts, _tied_acts, _signed_acts, _sparse_acts])
@pytest.mark.parametrize("top_k,percentile,chunk", [(8, 99.0, 4096), (8, 50.0, 7), (30, 0.0, 16)])
def test_activation_hub_equals_reference_loop(make_acts, top_k, percentile, chunk):
    acts = make_acts()
    fast = build_filter_graph(acts, "activation_hub", top_k, percentile, chunk)
    torch.testing.assert_close(fast, reference_activation_hub(acts, top_k, percentile), rtol=1e-12, atol=1e-12)
    assert torch.equal(fast, fast.T) and not fast.diagonal().any() and fast.max() == 1.0


@pytest.mark.parametrize("make_acts", [_random_acts, _tied_acts])
def test_coactivation_equals_loop(make_acts):
    acts = make_acts()
    fast = build_filter_graph(acts, "coactivation", top_k=8, percentile=60.0, chunk=9)
    torch.testing.assert_close(fast, sparsified(loop_coactivation(acts, 8), 60.0), rtol=1e-12, atol=1e-12)


def test_pearson_is_clipped_correlation_and_ignores_constant_filters():
    acts = _random_acts()
    acts[:, 3] = 0.5
    fast = build_filter_graph(acts, "pearson", percentile=0.0, chunk=9)
    corr = torch.corrcoef(acts.double().T).nan_to_num(0.0).clamp_min(0.0).fill_diagonal_(0.0)
    torch.testing.assert_close(fast, corr / corr.max())
    assert not fast[3].any()


def test_percentile_keeps_the_top_share_of_edges():
    acts = planted_activations(200)
    w = build_filter_graph(acts, top_k=20, percentile=90.0)
    raw = build_filter_graph(acts, top_k=20, percentile=0.0)
    kept, before = int((w > 0).sum()), int((raw > 0).sum())
    assert abs(kept - before / 10) <= 2


def test_to_networkx_keeps_isolated_filters_and_weights():
    w = torch.zeros(5, 5, dtype=torch.float64)
    w[0, 2] = w[2, 0] = 0.5
    w[1, 4] = w[4, 1] = 1.0
    graph = to_networkx(w)
    assert sorted(graph.nodes) == [0, 1, 2, 3, 4]
    assert {(u, v): d["weight"] for u, v, d in graph.edges(data=True)} == {(0, 2): 0.5, (1, 4): 1.0}
    assert all(type(d["weight"]) is float for *_, d in graph.edges(data=True))


def test_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="activation_hub"):
        build_filter_graph(_random_acts(), rule="cosine")


# --- communities and partitions ---------------------------------------------------------------

def test_planted_groups_are_recovered():
    result = compute_partition(planted_activations(), partition_cfg(mode="balanced"), seed=0)
    assert adjusted_rand_index(PLANTED, [result.communities[f] for f in range(F)]) >= 0.9
    assert adjusted_rand_index(PLANTED, filter_owners(result.groups, F)) >= 0.9
    assert result.modularity > 0.5


def test_same_seed_same_partition_and_whole_config_accepted():
    acts = planted_activations(300)
    first = compute_partition(acts, partition_cfg(), seed=3)
    second = compute_partition(acts, {"partition": partition_cfg()}, seed=3)
    assert first.groups == second.groups and first.communities == second.communities


def test_graph_without_edges_gives_singletons():
    graph = nx.empty_graph(6)
    communities, modularity = detect_communities(graph)
    assert sorted(communities.values()) == list(range(6)) and modularity == 0.0


@pytest.fixture(scope="module")
def planted_communities() -> dict[int, int]:
    return compute_partition(planted_activations(), partition_cfg(), seed=0).communities


@pytest.mark.parametrize("mode", sorted(PARTITION_MODES))
@pytest.mark.parametrize("k", [1, 3])
def test_every_mode_returns_k_disjoint_nonempty_lists(planted_communities, mode, k):
    groups = assign_partitions(planted_communities, F, k, mode=mode, seed=1)
    assert len(groups) == k and all(groups) and all(g == sorted(g) for g in groups)
    flat = [f for g in groups for f in g]
    assert len(flat) == len(set(flat)) and all(0 <= f < F for f in flat)


def test_balanced_covers_all_filters_evenly_and_keeps_communities(planted_communities):
    groups = assign_partitions(planted_communities, F, 4)
    assert sorted(f for g in groups for f in g) == list(range(F))
    assert sorted(map(set, groups), key=min) == [set(range(i, i + GROUP_SIZE)) for i in range(0, F, GROUP_SIZE)]
    uneven = assign_partitions(planted_communities, F, 5)
    assert max(map(len, uneven)) - min(map(len, uneven)) <= 1 and sum(map(len, uneven)) == F


def test_balanced_follows_capacities(planted_communities):
    capacities = [1.0, 2.0, 1.0]
    for num_filters, communities in ((F, planted_communities), (10, {f: f % 3 for f in range(10)})):
        groups = assign_partitions(communities, num_filters, 3, capacities=capacities)
        assert sum(map(len, groups)) == num_filters
        for group, c in zip(groups, capacities):
            assert abs(len(group) - round(num_filters * c / sum(capacities))) <= 1
    tiny_share = assign_partitions({f: 0 for f in range(3)}, 3, 3, capacities=[1.0, 1.0, 100.0])
    assert tiny_share == [[0], [1], [2]]  # every student gets at least one filter


def test_random_is_seeded_and_contiguous_is_in_order(planted_communities):
    assert assign_partitions(planted_communities, F, 3, "random", seed=5) == \
        assign_partitions(planted_communities, F, 3, "random", seed=5)
    assert assign_partitions(planted_communities, F, 3, "random", seed=5) != \
        assign_partitions(planted_communities, F, 3, "random", seed=6)
    assert assign_partitions({f: 0 for f in range(10)}, 10, 3, "contiguous") == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_prototype_drops_the_largest_group(planted_communities):
    communities = dict(planted_communities)
    singletons = set(range(0, 40, 2))
    communities.update({f: 100 + f for f in singletons})  # 20 singletons: merged, the largest group
    groups = assign_partitions(communities, F, 3, mode="prototype")
    assert set(range(F)) - {f for g in groups for f in g} == singletons


def test_prototype_refuses_too_many_students_unless_split(planted_communities):
    with pytest.raises(ValueError, match="supports at most 3 students.*split_largest: true"):
        assign_partitions(planted_communities, F, 5, mode="prototype")
    groups = assign_partitions(planted_communities, F, 5, mode="prototype", split_largest=True)
    assert len(groups) == 5 and sum(map(len, groups)) == 3 * GROUP_SIZE


@pytest.mark.parametrize("k,capacities,message", [
    (0, None, "at least 1"), (F + 1, None, "only 64 filters"),
    (2, [1.0], "one per student"), (2, [1.0, 0.0], "positive"),
])
def test_bad_requests_are_refused(planted_communities, k, capacities, message):
    with pytest.raises(ValueError, match=message):
        assign_partitions(planted_communities, F, k, capacities=capacities)


# --- files ------------------------------------------------------------------------------------

META = {"num_images": 600, "teacher_arch": "wrn_16_2", "teacher_layer": "body", "teacher_sha256": SHA,
        "dataset": "synthetic"}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("partition")
    cfg = partition_cfg(mode="prototype", num_students=2)
    r = compute_partition(planted_activations(), cfg, seed=0)
    doc = write_partition(out, r.groups, r.weights, r.graph, r.communities, r.modularity, cfg, META)
    return out, doc


def test_filter_owners_marks_unassigned_filters():
    assert filter_owners([[2, 0], [3]], 5) == [0, -1, 0, 1, -1]


def test_write_partition_writes_three_files(written):
    out, doc = written
    assert sorted(p.name for p in out.iterdir()) == ["filter_graph.graphml", "partition.json", "partition.png"]
    assert (out / "partition.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    graph = nx.read_graphml(out / "filter_graph.graphml", node_type=int)
    assert graph.number_of_nodes() == F and graph.number_of_edges() == doc["num_edges"]
    owner = filter_owners(doc["partitions"], F)
    assert all(graph.nodes[f]["student"] == owner[f] for f in range(F)) and -1 in owner  # P0 unassigned
    assert read_partition(out / "partition.json", teacher_sha256=SHA, num_filters=F) == doc
    assert doc["mode"] == "prototype" and doc["sizes"] == [len(g) for g in doc["partitions"]]


def test_write_partition_draws_large_graphs(tmp_path):
    """networkx needs scipy for spring layouts of 500+ nodes; the picture must not depend on it."""
    weights = torch.zeros(500, 500, dtype=torch.float64)
    weights[0, 1] = weights[1, 0] = 1.0
    graph = to_networkx(weights)
    groups = [list(range(250)), list(range(250, 500))]
    write_partition(tmp_path, groups, weights, graph, {f: f for f in range(500)}, 0.0, partition_cfg(), META)
    assert (tmp_path / "partition.png").read_bytes()[:4] == b"\x89PNG"


def _corrupted(written, tmp_path, edit) -> Path:
    doc = json.loads((written[0] / "partition.json").read_text())
    edit(doc)
    path = tmp_path / "partition.json"
    path.write_text(json.dumps(doc))
    return path


def test_read_partition_errors(written, tmp_path):
    with pytest.raises(FileNotFoundError, match="nonn partition"):
        read_partition(tmp_path / "nothing.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"schema_version": 1,')
    with pytest.raises(ValueError, match="broken.json: corrupt"):
        read_partition(broken)
    good = written[0] / "partition.json"
    with pytest.raises(ValueError, match="different teacher checkpoint.*nonn partition --force"):
        read_partition(good, teacher_sha256="cd" * 32)
    with pytest.raises(ValueError, match="64 teacher filters but the teacher has 32"):
        read_partition(good, num_filters=32)


@pytest.mark.parametrize("edit,message", [
    (lambda d: d["partitions"][1].append(d["partitions"][0][0]), "more than one partition"),
    (lambda d: d["partitions"][0].append(F), "not a filter index"),
    (lambda d: d["partitions"].append([]), "empty"),
    (lambda d: d.update(schema_version=2), "schema_version 2"),
    (lambda d: d.pop("teacher_sha256"), "missing keys teacher_sha256"),
])
def test_read_partition_refuses_bad_contents(written, tmp_path, edit, message):
    with pytest.raises(ValueError, match=message):
        read_partition(_corrupted(written, tmp_path, edit))


# --- activations ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model("wrn_10_1", 1, 4, [0.5], [0.25])


def _batches(num: int = 3, size: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.rand(size, 1, 12, 12, generator=g), torch.zeros(size, dtype=torch.long)) for _ in range(num)]


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_collect_activations_pools_the_final_feature_map(tiny_model, pooling):
    tiny_model.train()
    batches = _batches()
    acts = collect_activations(tiny_model, batches, pooling=pooling, progress=False)
    assert tiny_model.training and acts.shape == (15, 64) and acts.dtype == torch.float32
    assert (acts >= 0).all()
    tiny_model.eval()
    with torch.no_grad():
        maps = torch.cat([tiny_model.forward_features(x) for x, _ in batches])
    by_hand = maps.mean(dim=(2, 3)) if pooling == "mean" else maps.amax(dim=(2, 3))
    torch.testing.assert_close(acts, by_hand.clamp_min(0))
    acts[0, 0] = 1.0  # an ordinary tensor, not an inference-mode one


def test_collect_activations_honours_max_images(tiny_model):
    batches = _batches()

    def two_batches_then_fail():
        yield from batches[:2]
        raise AssertionError("a batch was read after max_images was reached")

    assert collect_activations(tiny_model, batches, max_images=7).shape == (7, 64)
    assert collect_activations(tiny_model, two_batches_then_fail(), max_images=10, progress=False).shape == (10, 64)
    assert collect_activations(tiny_model, iter(batches), max_images=100, progress=False).shape == (15, 64)
    with pytest.raises(ValueError, match="pooling"):
        collect_activations(tiny_model, batches, pooling="median")

