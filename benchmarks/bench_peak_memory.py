"""Peak-memory estimate against what ONNX Runtime allocates, for every model of some bundles.

    python benchmarks/bench_peak_memory.py EXPORT_DIR [EXPORT_DIR ...] [--out benchmarks/results_peak_memory.md]

For each ONNX model in each bundle (devices and aggregator): the estimate's parts (``bundle/memory.py``),
the bytes ONNX Runtime's allocations hold after loading, at the peak of a batch-1 run and during
loading (``measure_ort``), and estimate / measured. It also fits ONNX Runtime's own structures again
(bytes per session, per Conv node and per other node, by least squares over the models given), which
is how the constants in ``bundle/memory.py`` were chosen: run it after an ONNX Runtime upgrade.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bundle.memory import CONV_WORKSPACE_BYTES, measure_ort, peak_memory  # noqa: E402
from core.hardware import cpu_name  # noqa: E402
from core.io import write_text_atomic  # noqa: E402


def models(export_dir: Path) -> list[Path]:
    manifest = json.loads((export_dir / "manifest.json").read_text())
    parts = [*manifest["devices"], manifest["aggregator"]]
    return [export_dir / p["files"]["onnx"] for p in parts if p.get("files", {}).get("onnx")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exports", type=Path, nargs="+", help="bundle folders (a run's export/ or export_mp/)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here (markdown)")
    args = parser.parse_args()
    import onnx
    from onnxruntime import __version__ as ort_version

    lines = [f"Peak memory, estimate vs ONNX Runtime's allocations (batch 1, 1 thread); {cpu_name()}, onnxruntime {ort_version}",
             "", "| model | weights | activations | runtime (modelled) | estimate | loaded | run peak | load peak | "
             "estimate / run peak |", "|---|---|---|---|---|---|---|---|---|"]
    rows, ratios = [], []
    for export in args.exports:
        for path in models(export):
            estimate, measured = peak_memory(path), measure_ort(path)
            ops = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
            conv = ops["Conv"]
            # what the runtime held beyond weights and activations, less the conv working buffer
            overhead = measured["peak"] - estimate["weights"] - estimate["activations"] - (CONV_WORKSPACE_BYTES if conv else 0)
            rows.append(([1, conv, sum(ops.values()) - conv], overhead))
            ratio = estimate["total"] / measured["peak"]
            ratios.append(ratio)
            name = f"{export.parent.parent.name}/{export.parent.name}/{export.name}/{path.parent.name}"
            lines.append(f"| {name} | {estimate['weights']:,} | {estimate['activations']:,} | {estimate['runtime']:,} | "
                         f"{estimate['total']:,} | {measured['loaded']:,} | {measured['peak']:,} | "
                         f"{measured['load_peak']:,} | {ratio:.2f} |")
    fit, *_ = np.linalg.lstsq(np.array([r[0] for r in rows], float), np.array([r[1] for r in rows], float), rcond=None)
    lines += ["", f"{len(ratios)} models; estimate / measured from {min(ratios):.2f} to {max(ratios):.2f}.",
              f"Refit of ONNX Runtime's structures: {fit[0]:,.0f} B per session, {fit[1]:,.0f} B per Conv node, "
              f"{fit[2]:,.0f} B per other node."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        write_text_atomic(args.out, text)


if __name__ == "__main__":
    main()
