"""Benchmark the filter graph (DESIGN.md section 1, step 3): batched Activation-Hub rule against the
prototype's per-image, per-pair Python loop, plus Louvain on the resulting graph.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_filter_graph.py --out benchmarks/results_filter_graph.md

Activations are synthetic but structured like a teacher's: ReLU of a few shared latent factors
plus noise, so filters co-activate in groups and the graph has communities to find.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from partitioning import build_filter_graph, detect_communities, reference_activation_hub, to_networkx


def synthetic_activations(num_images: int, num_filters: int, seed: int, factors: int = 32,
                          chunk: int = 8192) -> torch.Tensor:
    """relu(z @ L + noise): each filter loads on one latent factor, so groups of filters fire together."""
    g = torch.Generator().manual_seed(seed)
    loadings = torch.zeros(factors, num_filters)
    loadings[torch.randint(0, factors, (num_filters,), generator=g), torch.arange(num_filters)] = \
        0.5 + torch.rand(num_filters, generator=g)
    parts = []
    for start in range(0, num_images, chunk):
        n = min(chunk, num_images - start)
        z = torch.randn(n, factors, generator=g)
        parts.append((z @ loadings + 0.5 * torch.randn(n, num_filters, generator=g)).relu_())
    return torch.cat(parts)


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median wall time over ``repeats`` runs, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def bench(num_filters: int, args: argparse.Namespace) -> dict:
    acts = synthetic_activations(args.images, num_filters, args.seed)
    fast_s, weights = timed(lambda: build_filter_graph(acts, "activation_hub", args.top_k, args.percentile),
                            args.repeats)
    fixed_s, _ = timed(lambda: reference_activation_hub(acts[:0], args.top_k, args.percentile), 2)
    small = args.reference_images
    ref_small_s, ref_weights = timed(lambda: reference_activation_hub(acts[:small], args.top_k, args.percentile), 1)
    ref_full_s = fixed_s + (ref_small_s - fixed_s) * args.images / small  # fixed cost + linear per-image cost
    check = build_filter_graph(acts[:small], "activation_hub", args.top_k, args.percentile)
    louvain_s, (graph, (communities, modularity)) = timed(
        lambda: (g := to_networkx(weights), detect_communities(g, args.resolution, args.seed)), args.repeats)
    return {
        "filters": num_filters, "fast_s": fast_s, "ref_small_s": ref_small_s, "ref_full_s": ref_full_s,
        "speedup": ref_full_s / fast_s, "max_abs_diff": float((check - ref_weights).abs().max()),
        "edges": graph.number_of_edges(), "louvain_s": louvain_s, "modularity": modularity,
        "communities": len(set(communities.values())),
    }


def table(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"| filters | batched graph, {args.images:,} images (s) | loop, {args.reference_images} images (s) "
        f"| loop, extrapolated to {args.images:,} (s) | speed-up | max abs diff vs loop | edges "
        "| to_networkx + Louvain (s) | modularity | communities |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['filters']:,} | {r['fast_s']:.2f} | {r['ref_small_s']:.2f} | {r['ref_full_s']:,.0f} "
                     f"| {r['speedup']:,.0f}x | {r['max_abs_diff']:.1e} | {r['edges']:,} | {r['louvain_s']:.2f} "
                     f"| {r['modularity']:.3f} | {r['communities']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--filters", type=int, nargs="+", default=[256, 2048])
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--percentile", type=float, default=99.0)
    parser.add_argument("--resolution", type=float, default=0.7)
    parser.add_argument("--reference-images", type=int, default=500,
                        help="the loop runs on this many images; its per-image cost is extrapolated")
    parser.add_argument("--repeats", type=int, default=3, help="median of this many runs of the batched code")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [bench(f, args) for f in args.filters]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    text = (f"torch {torch.__version__}, {args.threads} threads of {os.cpu_count()} CPUs "
            f"({platform.machine()}, load average at the end {load}); "
            f"activation_hub, top_k={args.top_k}, percentile={args.percentile}, Louvain resolution "
            f"{args.resolution}, seed {args.seed}\n\n{table(rows, args)}\n")
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
