"""Human-readable report.md from the report.json dictionary (any method)."""
from __future__ import annotations


def _kb(n: float) -> str:
    return f"{n / 1024:.1f} KiB"


def _m(n: float) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n / 1e3:.1f} k"


def _memory(m: dict | None) -> str:
    if m is None:
        return "- (no static shapes)"
    return f"{_kb(m['total'])} ({_kb(m['weights'])} + {_kb(m['activations'])} + {_kb(m['runtime'])})"


def _kb_or_dash(n: float | None) -> str:
    return "-" if n is None else _kb(n)


def _times(x: float | None) -> str:
    return "?" if x is None else f"{x:.1f}"


def render_markdown(r: dict) -> str:
    t, n = r["teacher"], r["method"]
    e = n["energy"]
    details = n["summary"]
    lines = [
        f"# {n['label']} report: {r['run']} ({r['dataset']}, {r['test_images']} test images)",
        "",
        "| model | test accuracy | params (largest device) | MACs/image (largest device) | peak memory (largest "
        "device) | bytes sent/inference | energy/inference (estimate) |",
        "|---|---|---|---|---|---|---|",
        f"| teacher {t['arch']} | {t['test_acc']:.4f} | {t['params']:,} | {_m(t['macs'])} | "
        f"{_kb_or_dash((t['peak_memory'] or {}).get('total'))} | - | {t['energy_uj']:,.1f} µJ |",
        f"| {n['label']}, {n['num_devices']} device(s) ({details + ', ' if details else ''}{n['weights']} weights, "
        f"{n['transport']} transport, ONNX Runtime) | "
        f"{n['test_acc_bundle']:.4f} | {n['max_device_params']:,} | {_m(n['max_device_macs'])} | "
        f"{_kb_or_dash(n['max_device_peak_memory'])} | {n['total_bytes_sent']:,} B total | "
        f"{n['energy']['per_inference_uj']:,.1f} µJ in all |",
        "",
        f"Each device sends {n['sends']}. Largest device is **{n['compression_vs_teacher']:.1f}x** smaller than "
        f"the teacher, needs **{n['macs_reduction_vs_teacher']:.1f}x** fewer MACs and "
        f"**{_times(n['memory_reduction_vs_teacher'])}x** less peak memory. Bundle vs PyTorch: "
        f"{n['bundle_agreement']:.2%} prediction agreement, max logit difference {n['bundle_max_logit_diff']:.2e} "
        f"(PyTorch accuracy {n['test_acc_pytorch']:.4f}).",
        "",
        f"Peak memory is weights + the largest set of live activations + ONNX Runtime's own structures, read "
        f"from each ONNX graph at batch 1 (`bundle/memory.py`). Energy is an **estimate**, not a measurement: "
        f"MACs x {e['pj_per_mac']:g} pJ ({e['compute']}) + bits received and sent x {e['nj_per_bit']:g} nJ "
        f"({e['link']}), README \"Energy\".",
        "",
        "## Devices",
        "",
        "| device | model | output width | params | weights (fp32) | model file | MACs/image | peak memory "
        "(weights + activations + runtime) | ONNX ms/image (batch 1, 1 thread) | bytes sent/inference | "
        "energy/inference (estimate) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for d in n["devices"]:
        lines.append(f"| {d['name']} | {d['arch']} | {d['output_width']} | {d['params']:,} | "
                     f"{_kb(d['weight_bytes'])} | {d['model_file']} ({_kb(d['model_file_bytes'])}) | {_m(d['macs'])} | "
                     f"{_memory(d['peak_memory'])} | {d['onnx_latency_ms']:.3f} | {d['bytes_sent_per_inference']:,} B | "
                     f"{d['energy_uj']:,.1f} µJ |")
    a = n["aggregator"]
    if n["topology"] != "chain":
        lines.append(f"| aggregator | {a['kind']} | - | {a['params']:,} | {_kb(a['weight_bytes'])} | - | "
                     f"{_m(a['macs'])} | {_memory(a['peak_memory'])} | - | - | {a['energy_uj']:,.1f} µJ |")
    lines += _model_parallel_lines(r.get("model_parallel"), n)
    how = ("a chain has no answer without every device" if n["topology"] == "chain"
           else "a failed device's vector is replaced by the aggregator's fill vector; its peers get none of its "
           "mid-network messages" if n["topology"] == "stages"
           else "a failed device's message is replaced by the aggregator's fill vector")
    lines += ["", f"## Device failures ({how})", "", "| failed devices | test accuracy |", "|---|---|"]
    for f in r["failures"]:
        acc = "no answer" if f["accuracy"] is None else f"{f['accuracy']:.4f}"
        lines.append(f"| {', '.join(map(str, f['missing'])) or 'none'} | {acc} |")
    return "\n".join(lines) + "\n"


def _model_parallel_lines(mp: dict | None, n: dict) -> list[str]:
    """The model-parallel baseline's section (none for MP itself)."""
    if not mp:
        return []
    lines = ["", f"## Baseline: model parallelism (teacher split layer-wise across {n['num_devices']} devices, "
             f"`export_mp/`)", "", f"Test accuracy {mp['test_acc']:.4f} (ONNX Runtime); no answer if any device "
             "fails.", "", "| device | teacher layers | params | MACs/image | bytes sent/inference |", "|---|---|---|---|---|"]
    for i, s in enumerate(mp["devices"]):
        lines.append(f"| {i} | {s['layers']} | {s['params']:,} | {_m(s['macs'])} | {s['bytes_sent']:,} B |")
    mp_sent = mp["bytes_sent_between_devices"]
    sent = n["total_bytes_sent"]
    ratio = (f"{mp_sent / max(sent, 1):.0f}x less" if sent <= mp_sent else f"{sent / max(mp_sent, 1):.1f}x more")
    return lines + ["", f"Model parallelism sends {mp_sent:,} B per image between devices; {n['label']} sends "
                    f"{sent:,} B ({ratio})."]
