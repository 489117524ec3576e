"""Human-readable report.md from the report.json dictionary."""
from __future__ import annotations


def _kb(n: float) -> str:
    return f"{n / 1024:.1f} KiB"


def _m(n: float) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n / 1e3:.1f} k"


def render_markdown(r: dict) -> str:
    t, n = r["teacher"], r["nonn"]
    lines = [
        f"# NoNN report: {r['run']} ({r['dataset']}, {r['test_images']} test images)",
        "",
        "| model | test accuracy | params (largest device) | MACs/image (largest device) | bytes sent/inference |",
        "|---|---|---|---|---|",
        f"| teacher {t['arch']} | {t['test_acc']:.4f} | {t['params']:,} | {_m(t['macs'])} | - |",
        f"| NoNN K={n['num_students']} ({n['partition_mode']}, {n['weights']} weights, {n['transport']} transport, "
        "ONNX Runtime) | "
        f"{n['test_acc_bundle']:.4f} | {n['max_device_params']:,} | {_m(n['max_device_macs'])} | "
        f"{n['total_bytes_sent']} B total |",
        "",
        f"Largest device is **{n['compression_vs_teacher']:.1f}x** smaller than the teacher and needs "
        f"**{n['macs_reduction_vs_teacher']:.1f}x** fewer MACs. Bundle vs PyTorch: "
        f"{n['bundle_agreement']:.2%} prediction agreement, max logit difference {n['bundle_max_logit_diff']:.2e} "
        f"(PyTorch accuracy {n['test_acc_pytorch']:.4f}).",
        "",
        "## Devices",
        "",
        "| device | student | filters | params | weights (fp32) | model file | MACs/image | bytes sent/inference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for d in n["devices"]:
        lines.append(f"| {d['name']} | {d['arch']} | {d['output_width']} | {d['params']:,} | "
                     f"{_kb(d['weight_bytes'])} | {d['model_file']} ({_kb(d['model_file_bytes'])}) | {_m(d['macs'])} | "
                     f"{d['bytes_sent_per_inference']} B |")
    a = n["aggregator"]
    lines.append(f"| aggregator | linear | - | {a['params']:,} | {_kb(a['weight_bytes'])} | - | {_m(a['macs'])} | - |")
    mp = r["model_parallel"]
    lines += ["", f"## Baseline: model parallelism (teacher split layer-wise across {n['num_students']} devices, "
              f"`export_mp/`)", "", f"Test accuracy {mp['test_acc']:.4f} (ONNX Runtime); no answer if any device "
              "fails.", "", "| device | teacher layers | params | MACs/image | bytes sent/inference |", "|---|---|---|---|---|"]
    for i, s in enumerate(mp["devices"]):
        lines.append(f"| {i} | {s['layers']} | {s['params']:,} | {_m(s['macs'])} | {s['bytes_sent']:,} B |")
    mp_sent = mp["bytes_sent_between_devices"]
    lines += ["", f"Model parallelism sends {mp_sent:,} B per image between devices; NoNN sends "
              f"{n['total_bytes_sent']} B ({mp_sent / max(n['total_bytes_sent'], 1):.0f}x less).", "",
              "## Device failures (a failed device's vector is replaced by its training mean)", "",
              "| failed devices | test accuracy |", "|---|---|"]
    for f in r["failures"]:
        lines.append(f"| {', '.join(map(str, f['missing'])) or 'none'} | {f['accuracy']:.4f} |")
    return "\n".join(lines) + "\n"
