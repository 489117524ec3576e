"""One table, a row per method, from the report.json of finished runs (``nonn run`` writes them).

    python benchmarks/method_table.py LABEL=RUN_DIR [LABEL=RUN_DIR ...] [--out FILE]

The teacher row comes from the first run's report; model parallelism from the first NoNN run's.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def row(label: str, acc: float, params: int, macs: int, sent: int | str, teacher_params: int) -> str:
    return (f"| {label} | {acc:.4f} | {params:,} | {macs / 1e6:.2f} M | {sent} | "
            f"{teacher_params / params:.1f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="LABEL=RUN_DIR (split at the last =)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    reports = [(label, json.loads((Path(path) / "report.json").read_text()))
               for label, path in (r.rsplit("=", 1) for r in args.runs)]
    t = reports[0][1]["teacher"]
    lines = ["| method | test accuracy | params per device | MACs per device | bytes sent per inference | "
             "compression vs teacher (params) |", "|---|---|---|---|---|---|",
             row(f"teacher {t['arch']}", t["test_acc"], t["params"], t["macs"], "-", t["params"])]
    for label, r in reports:
        n = r["nonn"]
        lines.append(row(label, n["test_acc_bundle"], n["max_device_params"], n["max_device_macs"],
                         f"{n['total_bytes_sent']} B", t["params"]))
    for label, r in reports:
        if r["nonn"]["num_students"] > 1:
            mp = r["model_parallel"]["devices"]
            sent = r["model_parallel"]["bytes_sent_between_devices"]
            lines.append(f"| model parallelism, teacher over {len(mp)} devices | "
                         f"{r['model_parallel']['test_acc']:.4f} | {max(s['params'] for s in mp):,} | "
                         f"{max(s['macs'] for s in mp) / 1e6:.2f} M | {sent:,} B | "
                         f"{t['params'] / max(s['params'] for s in mp):.1f}x |")
            break
    failures = ["", "Accuracy under device failures (mean over every subset of that many failed devices; a failed "
                "device's vector is replaced by its training mean):", "",
                "| method | 0 failed | 1 failed | 2 failed | 3 failed |", "|---|---|---|---|---|"]
    for label, r in reports:
        k = r["nonn"]["num_students"]
        if k < 2:
            continue
        by_count: dict[int, list[float]] = {}
        for f in r["failures"]:
            by_count.setdefault(len(f["missing"]), []).append(f["accuracy"])
        cells = [f"{sum(v) / len(v):.4f}" if (v := by_count.get(c)) else "-" for c in range(4)]
        failures.append(f"| {label} | " + " | ".join(cells) + " |")
    text = "\n".join(lines + failures) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
