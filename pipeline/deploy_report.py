"""``deploy_report.json`` and ``deploy_report.md``: what ``nonn deploy`` measured, as a record and as a page."""
from __future__ import annotations

from pathlib import Path

from core.io import write_json_atomic, write_text_atomic


def wire_total(section: dict) -> float:
    """Bytes on the wire per inference, every sender together (input, devices, answer)."""
    return sum(p["wire_bytes"] for p in section["per_inference"].values())


def write_reports(out_dir: Path, report: dict) -> None:
    write_json_atomic(out_dir / "deploy_report.json", report)
    write_text_atomic(out_dir / "deploy_report.md", render_markdown(report))


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def render_markdown(r: dict) -> str:
    link = r["link"]
    senders = "every sender: source, devices, aggregator" if link.get("scope", "all") == "all" else "the devices only"
    shaped = (f"emulated links: {link['mbit_per_s'] or 'unlimited'} Mbit/s, {link['latency_ms'] or 0} ms per message "
              f"(applied by {senders})") if link["emulated"] else "loopback, no link emulation"
    lat, acc, b = r["latency_ms_batch1"], r["accuracy"], r["bytes_per_inference"]
    lines = [f"# Deployment report: bundle {r['bundle_id']} ({r['devices']} devices, {r['transport']} transport)", "",
             f"Broker {r['broker']}; {shaped}; {r['hardware']['cpu']}, {r['hardware']['cores']} cores; "
             f"deadline {r['deadline_ms']:g} ms; {r['images']} test images.", "",
             "| measure | value |", "|---|---|",
             f"| accuracy over the wire | {acc['over_the_wire']:.4f} |",
             f"| bundle accuracy in report.json | {_fmt(acc['bundle_report'], 4)} |",
             f"| every wire prediction equals the bundle's | {acc['predictions_equal_bundle']} |",
             f"| latency batch 1, p50 / p95 / p99 / max (ms) | {_fmt(lat.get('p50'))} / {_fmt(lat.get('p95'))} / "
             f"{_fmt(lat.get('p99'))} / {_fmt(lat.get('max'))} |",
             f"| throughput, {r['throughput']['window']} in flight (inferences/s) | "
             f"{_fmt(r['throughput']['inferences_per_s'], 1)} |",
             f"| answers past the deadline in that phase (devices filled in) | "
             f"{r['throughput']['answered_with_devices_missing']} |",
             f"| bytes per inference, input (payload / on the wire) | {b['input_payload']:.0f} / {b['input_wire']:.0f} |",
             f"| bytes per inference, all devices (payload / on the wire) | {b['devices_payload']:.0f} / "
             f"{b['devices_wire']:.0f} |",
             f"| bytes per inference, answer (payload / on the wire) | {b['answer_payload']:.0f} / "
             f"{b['answer_wire']:.0f} |",
             f"| lost requests (of {r['requests']}) | {r['lost']['total']} |", "",
             "| process | payload B/inference | wire B/inference | compute ms/inference |", "|---|---|---|---|"]
    for name, p in r["per_inference"].items():
        lines.append(f"| {name} | {p['payload_bytes']:.0f} | {p['wire_bytes']:.0f} | {_fmt(p['compute_ms'], 3)} |")
    mp = r.get("model_parallel")
    if mp:
        ml, mb = mp["latency_ms_batch1"], mp["bytes_per_inference"]
        name = r["method"]
        lines += ["", f"{name} against model parallelism (the teacher split layer-wise at MAC-balanced cuts over "
                  f"{mp['devices']} devices, each sending its feature map), same broker and links:", "",
                  f"| | {name} | MP |", "|---|---|---|",
                  f"| accuracy over the wire | {acc['over_the_wire']:.4f} | {mp['accuracy']['over_the_wire']:.4f} |",
                  f"| latency p50 / p99 (ms) | {_fmt(lat.get('p50'))} / {_fmt(lat.get('p99'))} | "
                  f"{_fmt(ml.get('p50'))} / {_fmt(ml.get('p99'))} |",
                  f"| throughput (inferences/s) | {_fmt(r['throughput']['inferences_per_s'], 1)} | "
                  f"{_fmt(mp['throughput']['inferences_per_s'], 1)} |",
                  f"| device bytes per inference, payload / wire | {b['devices_payload']:.0f} / {b['devices_wire']:.0f} | "
                  f"{mb['devices_payload']:.0f} / {mb['devices_wire']:.0f} |",
                  f"| all bytes on the wire per inference (input, devices, answer) | {wire_total(r):.0f} | "
                  f"{wire_total(mp):.0f} |",
                  f"| lost requests | {r['lost']['total']} | {mp['lost']['total']} |", "",
                  f"MP's p50 latency is {r['vs_mp']['latency_p50_ratio']:.1f}x {name}'s; it puts "
                  f"{r['vs_mp']['bytes_on_the_wire_ratio']:.1f}x the bytes on the wire."]
    d = r["drill"]
    if d:
        dl = d["latency_ms"]
        lines += ["", f"Fault drill: {d['device']} SIGKILLed at request {d['killed_at_request']}, restarted at "
                  f"{d['restarted_at_request']}, of {d['requests']}. Lost: {d['lost']}. Answered without it: "
                  f"{d['answered_without_device']}, predictions equal to the bundle's with it missing: "
                  f"{d['predictions_equal_bundle_missing_device']}; accuracy while it was down "
                  f"{_fmt(d['accuracy_without_device'], 4)} on those images (failure table, every test image: "
                  f"{_fmt(d.get('failure_table_accuracy'), 4)}). Latency p50 / max {_fmt(dl.get('p50'))} / "
                  f"{_fmt(dl.get('max'))} ms. Rejoined {_fmt(d['rejoined_after_restart_ms'], 0)} ms after restart: "
                  f"{d['answered_whole_after_rejoin']}."]
    return "\n".join(lines) + "\n"
