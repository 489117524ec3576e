"""``nonn compare RUN_DIR ...``: finished runs side by side, as a table (markdown and JSON) and three plots.

One row per run, from its ``report.json`` and, when ``nonn deploy`` ran, its ``deploy_report.json``.
``benchmarks/rows.py`` renders the committed comparison tables with the same functions, so a user's
table and the project's read alike.

Latency is the deployed p50 when the run was deployed; otherwise it is modelled at ``link_mbit``:
for side-by-side devices, the slowest of (its ONNX Runtime time + its message at the link rate);
for a chain, the sum of every device's time and message. The plots say which.
"""
from __future__ import annotations

import statistics
from pathlib import Path

from core.io import atomic_path, read_json, write_json_atomic, write_text_atomic

PLOTS = ("accuracy_vs_bytes.png", "accuracy_vs_latency.png", "accuracy_vs_devices_down.png")
MARKERS = "os^Dv<>PX*"  # one per run, so that runs at the same point (MP and HALP) both show


def failure_mean(failures: list[dict], count: int) -> float | None:
    """Mean accuracy over the subsets of ``count`` failed devices; None when there are none, or when the
    method gives no answer then (a broken chain)."""
    accs = [f["accuracy"] for f in failures if len(f["missing"]) == count]
    return statistics.mean(accs) if accs and None not in accs else None


def modelled_latency_ms(devices: list[dict], chain: bool, link_mbit: float) -> float | None:
    """Batch-1 latency from the devices' ONNX Runtime times and their messages at ``link_mbit`` Mbit/s."""
    times = [d.get("onnx_latency_ms") for d in devices]
    if None in times:
        return None
    legs = [t + d["bytes_sent_per_inference"] * 8 / (link_mbit * 1e3) for t, d in zip(times, devices)]
    return sum(legs) if chain else max(legs)


def summarize(report: dict, deploy: dict | None = None, label: str | None = None, link_mbit: float = 1.0) -> dict:
    """One run as a comparison row: what its report and deploy report say, in one flat shape."""
    n = report["method"]
    devices = n["devices"]
    chain = n.get("topology") == "chain"
    p50 = (deploy or {}).get("latency_ms_batch1", {}).get("p50")
    return {
        "label": label or n["label"], "run": report["run"], "dataset": report["dataset"], "method": n["name"],
        "devices": len(devices), "test_acc": n["test_acc_bundle"],
        "params": max(d["params"] for d in devices), "macs": max(d["macs"] for d in devices),
        "peak_memory": n.get("max_device_peak_memory"),
        "energy_uj": n.get("energy", {}).get("per_inference_uj"),
        "bytes_sent": n["total_bytes_sent"],
        "onnx_ms": max((d["onnx_latency_ms"] for d in devices if d.get("onnx_latency_ms") is not None), default=None),
        "latency_ms": p50 if p50 is not None else modelled_latency_ms(devices, chain, link_mbit),
        "latency_source": "deployed p50" if p50 is not None else f"modelled at {link_mbit:g} Mbit/s",
        "down": {str(k): failure_mean(report["failures"], k) for k in range(1, len(devices))},
    }


def load_run(run_dir: Path, link_mbit: float = 1.0) -> dict:
    """A finished run's row; a clear error for a folder that is not one."""
    report_path = Path(run_dir) / "report.json"
    if not report_path.exists():
        raise ValueError(f"{run_dir}: not a finished run (no report.json); finish it with `nonn run` or "
                         "`nonn evaluate` first")
    report = read_json(report_path, "report")
    deploy_path = Path(run_dir) / "deploy_report.json"
    deploy = read_json(deploy_path, "deploy report") if deploy_path.exists() else None
    return summarize(report, deploy, link_mbit=link_mbit)


def load_runs(run_dirs: list[Path], link_mbit: float = 1.0) -> list[dict]:
    if len(run_dirs) < 1:
        raise ValueError("nonn compare needs at least one run folder")
    rows = [load_run(d, link_mbit) for d in run_dirs]
    datasets = {r["dataset"] for r in rows}
    if len(datasets) > 1:
        odd = next(d for d, r in zip(run_dirs, rows) if r["dataset"] != rows[0]["dataset"])
        raise ValueError(f"{odd}: a {next(r['dataset'] for r in rows if r['dataset'] != rows[0]['dataset'])} run, "
                         f"but {run_dirs[0]} is {rows[0]['dataset']}; compare runs on one data set")
    return rows


def mean_std(values: list[float | None], scale: float = 1.0, digits: int = 2) -> str:
    """Mean (± sample std when there are several), or why there is none."""
    if not values or None in values:
        return "-"
    mean = scale * statistics.mean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {scale * statistics.stdev(values):.{digits}f}"


def per_host_mean(values: list[tuple[str | None, float | None]], fmt: str, unit: str = "") -> str:
    """Mean of the (host, value) pairs per machine, so that only like is averaged with like (missing values,
    from older records, are left out); the machine is named unless every value came from the CPU (or
    from runs that do not say, as a user's own do)."""
    by_host: dict[str | None, list[float]] = {}
    for machine, value in values:
        if value is not None:
            by_host.setdefault(machine, []).append(value)
    plain = set(by_host) <= {"CPU", None}
    return ", ".join(format(statistics.mean(v), fmt) + unit + ("" if plain else f" ({h})")
                     for h, v in by_host.items()) or "-"


def _machines(group: list[dict], key: str) -> list[tuple[str | None, float | None]]:
    return [(g.get("host"), g[key]) for g in group]


def down_cell(values: list[float | None], count: int, devices: int) -> str:
    """The 'devices down' cell: the accuracy (%) over seeds with ``count`` of ``devices`` down, or why
    there is none (None: the method gives no answer then)."""
    if count >= devices:
        return "no device left"
    return "no answer" if None in values else mean_std(values, 100)


def _kib(value: float | None) -> str:
    return "-" if value is None else f"{value / 1024:,.0f} KiB"


def table_lines(groups: list[list[dict]]) -> list[str]:
    """The comparison table; each group is one row (its runs are seeds of one setting: mean ± std)."""
    lines = ["| method | devices | test accuracy (%) | seeds | params per device | MACs per device | "
             "peak memory per device | energy per inference (estimate) | ONNX ms per device (batch 1, 1 thread) | "
             "bytes sent per inference | latency (ms) | 1 device down (%) | 2 devices down (%) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for group in groups:
        r = group[0]
        latency = per_host_mean(_machines(group, "latency_ms"), ".2f")
        lines.append(
            f"| {r['label']} | {r['devices']} | {mean_std([g['test_acc'] for g in group], 100)} | {len(group)} | "
            f"{r['params']:,} | {r['macs'] / 1e6:.2f} M | {_kib(r['peak_memory'])} | "
            f"{per_host_mean([(None, g['energy_uj']) for g in group], ',.0f', ' µJ')} | "
            f"{per_host_mean(_machines(group, 'onnx_ms'), '.3f')} | {r['bytes_sent']:,} B | "
            f"{latency + ' (' + r['latency_source'] + ')' if latency != '-' else '-'} | "
            + " | ".join(down_cell([g["down"].get(str(n)) for g in group], n, r["devices"]) for n in (1, 2))
            + " |")
    return lines


def write_plots(groups: list[list[dict]], out_dir: Path, title: str) -> list[Path]:
    """Accuracy against bytes per inference, against latency, and against devices down (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def mean(group: list[dict], key: str) -> float | None:
        values = [g[key] for g in group]
        return None if None in values else statistics.mean(values)

    paths = []
    for name, key, xlabel in ((PLOTS[0], "bytes_sent", "bytes sent between devices per inference (log)"),
                              (PLOTS[1], "latency_ms", "latency per inference, batch 1 (ms, log)")):
        fig, ax = plt.subplots(figsize=(6.4, 4.8))
        for i, group in enumerate(groups):
            x, y = mean(group, key), mean(group, "test_acc")
            if x is not None:
                ax.scatter(max(x, 1e-3), 100 * y, s=70 - 5 * (i % 10), marker=MARKERS[i % len(MARKERS)],
                           alpha=0.8, label=group[0]["label"])
        sources = sorted({g[0]["latency_source"] for g in groups})
        ax.set_xscale("log")
        ax.set_xlabel(xlabel if key == "bytes_sent" else f"{xlabel}; {', '.join(sources)}")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=1, frameon=False)
        else:
            ax.text(0.5, 0.5, "no run has this measure", ha="center", transform=ax.transAxes)
        ax.set_title(title, fontsize=9)
        paths.append(_save(fig, out_dir / name, plt))
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for i, group in enumerate(groups):
        counts = [c for c in range(group[0]["devices"]) if c == 0 or
                  all(g["down"].get(str(c)) is not None for g in group)]
        accs = [100 * (mean(group, "test_acc") if c == 0 else statistics.mean(g["down"][str(c)] for g in group))
                for c in counts]
        ax.plot(counts, accs, marker=MARKERS[i % len(MARKERS)], alpha=0.8, label=group[0]["label"])
    ax.set_xlabel("devices down (a method with no answer then is not drawn)")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=1, frameon=False)
    ax.set_title(title, fontsize=9)
    paths.append(_save(fig, out_dir / PLOTS[2], plt))
    return paths


def _save(fig, path: Path, plt) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def compare(run_dirs: list[Path], out_dir: Path, link_mbit: float = 1.0) -> str:
    """Write ``comparison.md``, ``comparison.json`` and the plots into ``out_dir``; returns the markdown."""
    rows = load_runs(run_dirs, link_mbit)
    groups = [[r] for r in rows]
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = "\n".join([f"# Comparison: {len(rows)} runs on {rows[0]['dataset']}", "", *table_lines(groups), "",
                          "Peak memory: weights + live activations + ONNX Runtime's structures (bundle/memory.py). "
                          "Energy: an estimate from MACs and bytes moved (core/energy.py), not a measurement.",
                          "", *[f"![{p}]({p})" for p in PLOTS], ""])
    write_json_atomic(out_dir / "comparison.json", {"runs": [str(d) for d in run_dirs], "rows": rows})
    write_text_atomic(out_dir / "comparison.md", markdown)
    write_plots(groups, out_dir, f"{len(rows)} runs on {rows[0]['dataset']}")
    return markdown
