"""Every benchmark row in benchmarks/rows.yaml resolves to a valid config before anyone spends an hour on it,
and the tables render from records alone."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import rows
from pipeline.cli import build_parser
from pipeline.compare import PLOTS
from pipeline.config import load_config

SPEC = rows.load_spec()
ALL_ROWS = [(table, row) for table, t in SPEC["tables"].items() for row in t["rows"]]


@pytest.mark.parametrize("table,row", ALL_ROWS)
def test_row_commands_resolve_to_valid_configs(table, row, tmp_path):
    for cmd in rows.commands_for(SPEC, table, row, seed=1, run_dir=tmp_path):
        assert cmd[1:3] == ["-m", "pipeline"]
        args, overrides = build_parser().parse_known_args(cmd[3:])
        config = load_config(args.config, overrides)
        teacher = SPEC["tables"][table].get("teacher", SPEC["teacher"])  # a table may train its own (null)
        assert config["seed"] == 1 and config["teacher"]["checkpoint"] == teacher
        for key, value in {**SPEC["tables"][table].get("overrides", {}),
                           **SPEC["tables"][table]["rows"][row].get("overrides", {})}.items():
            node = config
            for part in key.split("."):
                node = node[part]
            assert node == value, key


def test_tables_render_from_records(tmp_path, monkeypatch):
    monkeypatch.setattr(rows, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(rows, "PLOTS", tmp_path / "plots")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- table:methods -->\nold\n<!-- /table:methods -->\nend\n")
    monkeypatch.setattr(rows, "README", readme)
    config = load_config(Path(rows.ROOT) / "configs/fashion_mnist/standard.yaml")
    hardware = {"cpu": "Test CPU", "cpu_cores": 2}
    for seed, acc in ((0, 0.90), (1, 0.92)):
        record = {"row": "nonn_k2", "label": "NoNN K=2", "seed": seed, "config": config, "hardware": hardware,
                  "wall_seconds": 600.0, "test_acc": acc,
                  "distill": {"best_val_acc": acc + 0.01, "precision": "bf16-mixed", "fit_seconds": 1500.0,
                              "epochs": 15},
                  "teacher": {"arch": "wrn_16_2", "test_acc": 0.94, "params": 691386, "macs": 77_000_000},
                  "devices": [{"params": 81136, "macs": 9_550_000, "bytes_sent_per_inference": 256}] * 2,
                  "failures": [{"missing": [], "accuracy": acc}, {"missing": [0], "accuracy": 0.7},
                               {"missing": [1], "accuracy": 0.8}]}
        path = rows.record_path("methods", "nonn_k2", seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record))
    rows.render_tables()
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("end\n") and "old" not in text
    line = next(t for t in text.splitlines() if t.startswith("| NoNN K=2"))
    # mean ± sample std over the two seeds: 91.00 ± 1.41; failures: mean of [0.7, 0.8] per seed = 75.00 ± 0.00
    assert ("| 91.00 ± 1.41 | 2 | 92.00 ± 1.41 | 81,136 | 9.55 M | 512 B | 75.00 ± 0.00 | no device left | 100 s |"
            in line)
    assert "| teacher wrn_16_2 | 94.00 |" in text and "Test CPU, 2 cores, bf16-mixed" in text


def test_comparison_table_renders_every_column_from_records(tmp_path, monkeypatch):
    """A chain (MP) has no answer with a device down; with 2 devices, 2 down leaves none. Latency is modelled
    at 1 Mbit/s from the records: the slowest device's time and message (a chain: their sum). A record
    with a ``summary`` (nonn compare's row) also shows peak memory and energy, and the plots are drawn."""
    monkeypatch.setattr(rows, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(rows, "PLOTS", tmp_path / "plots")
    readme = tmp_path / "README.md"
    readme.write_text("<!-- table:comparison -->\n<!-- /table:comparison -->\n")
    monkeypatch.setattr(rows, "README", readme)
    spec = {"tables": {"comparison": {"kind": "comparison", "rows": {
        row: {"label": label, "config": "c.yaml"} for row, label in (("vp", "VP"), ("mp", "MP"), ("nonn", "NoNN"))}}}}
    monkeypatch.setattr(rows, "load_spec", lambda: spec)
    hardware = {"cpu": "Test CPU", "cpu_cores": 2}
    for row, failures, latency in (("vp", [{"missing": [0], "accuracy": 0.8}, {"missing": [1], "accuracy": 0.9}], 0.5),
                                   ("mp", [{"missing": [0], "accuracy": None}, {"missing": [1], "accuracy": None}], 2.0)):
        record = {"row": row, "label": row.upper(), "seed": 0, "hardware": hardware, "test_acc": 0.9,
                  "config": {"name": row, "data": {"dataset": "fashion_mnist"}}, "method": row,
                  "bytes_sent": 48 if row == "vp" else 50_176, "distill": {"precision": "32-true"},
                  "devices": [{"params": 1000, "macs": 2_000_000, "bytes_sent_per_inference": 24,
                               "onnx_latency_ms": latency}] * 2,
                  "failures": [{"missing": [], "accuracy": 0.9}, *failures]}
        path = rows.record_path("comparison", row, 0)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record))
    summary = rows.record_summary(json.loads(rows.record_path("comparison", "vp", 0).read_text()))
    summary.update(label="NoNN", peak_memory=900 * 1024, energy_uj=1234.4, latency_ms=7.5,
                   latency_source="deployed p50")
    path = rows.record_path("comparison", "nonn", 0)
    path.write_text(json.dumps({"row": "nonn", "label": "NoNN", "seed": 0, "hardware": hardware,
                                "distill": {"precision": "32-true"}, "summary": summary}))
    rows.render_tables()
    lines = readme.read_text().splitlines()
    # 24 B at 1 Mbit/s is 0.192 ms: VP max(0.5 + 0.192) = 0.69; MP (a chain) 2 x (2.0 + 0.192) = 4.38
    assert ("| VP | 2 | 90.00 | 1 | 1,000 | 2.00 M | - | - | 0.500 | 48 B | 0.69 (modelled at 1 Mbit/s) | 85.00 | "
            "no device left |") in lines
    assert ("| MP | 2 | 90.00 | 1 | 1,000 | 2.00 M | - | - | 2.000 | 50,176 B | 4.38 (modelled at 1 Mbit/s) | "
            "no answer | no device left |") in lines
    assert ("| NoNN | 2 | 90.00 | 1 | 1,000 | 2.00 M | 900 KiB | 1,234 µJ | 0.500 | 48 B | 7.50 (deployed p50) | "
            "85.00 | no device left |") in lines
    assert sorted(p.name for p in (tmp_path / "plots" / "comparison").iterdir()) == sorted(PLOTS)


def test_same_as_row_shows_the_other_tables_records_and_is_never_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(rows, "RESULTS", tmp_path / "results")
    spec = {"tables": {"methods": {"kind": "methods", "rows": {"kd": {"label": "KD", "config": "c.yaml"}}},
                       "comparison": {"kind": "comparison", "rows": {
                           "single_kd": {"label": "single KD", "config": "c.yaml", "same_as": "methods/kd"}}}}}
    monkeypatch.setattr(rows, "load_spec", lambda: spec)
    path = rows.record_path("methods", "kd", 0)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"row": "kd", "label": "KD", "seed": 0, "test_acc": 0.9}))
    shown = rows.records("comparison")
    assert list(shown) == ["single_kd"] and shown["single_kd"][0]["label"] == "single KD"
    assert shown["single_kd"][0]["test_acc"] == 0.9
    monkeypatch.setattr(rows, "run_one", lambda *a: pytest.fail("a same_as row was run"))
    assert rows.run_rows("comparison", None, None, tmp_path / "work", force=False)
    assert "the records of methods/kd" in capsys.readouterr().out


def test_a_record_is_shown_under_its_rows_current_label(tmp_path, monkeypatch):
    """A row relabelled in rows.yaml after it ran (a default changed under it) shows the new label; a record
    of a row no longer declared keeps its own."""
    monkeypatch.setattr(rows, "RESULTS", tmp_path / "results")
    spec = {"tables": {"methods": {"kind": "methods", "rows": {
        "nonn": {"label": "NoNN, beta 1e4 constant", "config": "c.yaml"}}}}}
    monkeypatch.setattr(rows, "load_spec", lambda: spec)
    for row in ("nonn", "gone"):
        path = rows.record_path("methods", row, 0)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"row": row, "label": f"{row} as it ran", "seed": 0, "test_acc": 0.9}))
    shown = rows.records("methods")
    assert {row: r[0]["label"] for row, r in shown.items()} == {"nonn": "NoNN, beta 1e4 constant",
                                                                 "gone": "gone as it ran"}


def test_parallel_runs_every_pending_row_once_with_the_extra_overrides(tmp_path, monkeypatch):
    monkeypatch.setattr(rows, "RESULTS", tmp_path / "results")
    ran = []

    def run_one(spec, table, row, seed, work, extra):
        ran.append((row, seed, extra))
        return row != "kd_total"  # this row fails

    monkeypatch.setattr(rows, "run_one", run_one)
    assert not rows.run_rows("methods", ["nonn_k2", "kd_total"], [0, 1], tmp_path, force=False, parallel=3,
                             extra=rows.parse_sets(["trainer.num_threads=2"])), "a failed row fails the run"
    assert sorted(ran) == [(r, s, {"trainer.num_threads": 2}) for r in ("kd_total", "nonn_k2") for s in (0, 1)]


def test_pending_lists_each_declared_seed_without_a_record_and_skips_same_as_rows(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(rows, "RESULTS", tmp_path / "results")
    spec = {"tables": {
        "methods": {"kind": "methods", "rows": {"kd": {"label": "KD", "config": "c.yaml", "seeds": [0, 1, 2]},
                                                "lcp": {"label": "LCP", "config": "c.yaml"}}},
        "comparison": {"kind": "comparison", "rows": {
            "single_kd": {"label": "single KD", "config": "c.yaml", "same_as": "methods/kd"}}}}}
    monkeypatch.setattr(rows, "load_spec", lambda: spec)
    for seed in (0, 2):
        path = rows.record_path("methods", "kd", seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"row": "kd", "seed": seed, "test_acc": 0.9}))
    assert rows.print_pending([]) == 2
    out = capsys.readouterr().out.splitlines()
    assert out == ["methods: 2 pending",
                   "  python benchmarks/rows.py run methods --rows kd --seeds 1",
                   "  python benchmarks/rows.py run methods --rows lcp --seeds 0",
                   "comparison: every declared row has its records"]
    with pytest.raises(SystemExit, match="unknown table 'nope'"):
        rows.print_pending(["nope"])


def test_set_without_a_value_is_refused_in_one_line():
    with pytest.raises(SystemExit, match="--set 'trainer.num_threads': expected KEY=VALUE"):
        rows.parse_sets(["trainer.num_threads"])


def test_losses_text_writes_numbers_short_and_names_as_they_are():
    config = {"distill": {"losses": {"kd": {"alpha": 0.9, "temperature": 4.0},
                                     "filter_transfer_per_student": {"beta": 10000.0, "schedule": "cosine"},
                                     "ce": None}}}
    assert rows.losses_text(config) == ("kd alpha=0.9 temperature=4, "
                                        "filter_transfer_per_student beta=10000 schedule=cosine, ce")


def test_cells_average_only_like_machines():
    cpu, gpu = {"cpu": "X", "cpu_cores": 2}, {"cpu": "X", "cpu_cores": 16, "gpu": "NVIDIA H100 80GB HBM3"}
    rs = [{"hardware": cpu, "distill": {"fit_seconds": 300.0, "epochs": 15, "fit_epochs": 10}},
          {"hardware": gpu, "distill": {"fit_seconds": 150.0, "epochs": 15}}]
    assert rows.epoch_seconds(rs) == "30 s (X), 10 s (H100 host)"
    assert rows.epoch_seconds(rs[:1], alone=True) == "30 s"
    resumed = {"hardware": cpu, "distill": {"fit_seconds": 0.4, "epochs": 15, "fit_epochs": 0}}  # after training
    assert rows.epoch_seconds([rs[0], resumed], alone=True) == "30 s"
    assert rows.epoch_seconds([resumed], alone=True) == "-"
    # one CPU name, two machines (AVX2 and AVX-512, twice as fast): never averaged together, each named
    avx2 = {"cpu": "AMD EPYC", "cpu_cores": 2, "cpu_capability": "AVX2"}
    avx512 = {"cpu": "AMD EPYC", "cpu_cores": 2, "cpu_capability": "AVX512"}
    mixed = [{"hardware": avx2, "distill": {"fit_seconds": 3000.0, "epochs": 15}},
             {"hardware": avx512, "distill": {"fit_seconds": 1500.0, "epochs": 15}}]
    assert rows.epoch_seconds(mixed) == "200 s (AMD EPYC AVX2), 100 s (AMD EPYC AVX512)"
    assert rows.machine({"hardware": {"cpu": "Intel(R) Xeon(R) Processor", "cpu_capability": "AVX512"}}) == \
        "Intel Xeon AVX512"


def test_a_table_names_its_machines_in_cells_only_when_it_mixes_them(tmp_path, monkeypatch):
    monkeypatch.setattr(rows, "RESULTS", tmp_path / "results")

    def write(row: str, capability: str) -> None:
        path = rows.record_path("methods", row, 0)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"row": row, "seed": 0, "hardware": {"cpu": "AMD EPYC", "cpu_cores": 2,
                                                                       "cpu_capability": capability},
                                    "distill": {"precision": "32-true"}}))

    write("kd", "AVX2")
    assert rows.one_machine(rows.records("methods"))
    assert rows.hardware_line("methods") == "Ran on: AMD EPYC (AVX2), 2 cores, 32-true."
    write("lcp", "AVX512")
    assert not rows.one_machine(rows.records("methods"))
    assert rows.hardware_line("methods") == ("Ran on: AMD EPYC (AVX2), 2 cores, 32-true; "
                                             "AMD EPYC (AVX512), 2 cores, 32-true.")


def test_refresh_costs_adds_the_summary_only_where_the_run_folder_evaluates_the_same(tmp_path, monkeypatch):
    monkeypatch.setattr(rows, "RESULTS", tmp_path / "results")
    work = tmp_path / "work"
    device = {"params": 1000, "macs": 2_000_000, "bytes_sent_per_inference": 24, "onnx_latency_ms": 0.5,
              "peak_memory": {"total": 4096}}

    def report(acc: float) -> dict:
        return {"run": "r", "dataset": "fashion_mnist", "failures": [{"missing": [], "accuracy": acc}],
                "method": {"name": "vp", "label": "VP", "devices": [device], "test_acc_bundle": acc,
                           "total_bytes_sent": 24, "max_device_peak_memory": 4096, "topology": "gather",
                           "energy": {"per_inference_uj": 12.5}}}

    for row, acc, evaluates_to in (("vp", 0.9, 0.9), ("cp", 0.9, 0.8), ("lcp", 0.9, None)):
        path = rows.record_path("comparison", row, 0)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"row": row, "label": row, "seed": 0, "test_acc": acc,
                                    "commands": [f"nonn run --config c.yaml --run-dir RUN_DIR --seed 0 --x.{row} 1"]}))
        if evaluates_to is not None:  # lcp's run folder is gone
            (work / "comparison" / f"{row}-seed0").mkdir(parents=True)
            (work / "comparison" / f"{row}-seed0" / "report.json").write_text(json.dumps(report(evaluates_to)))
    calls, real_run = [], subprocess.run

    def fake_run(cmd, **kwargs):
        if "pipeline" not in cmd:  # git, for the record's commit
            return real_run(cmd, **kwargs)
        calls.append(cmd)
        row = cmd[-3].removeprefix("--x.")  # the record's own options, its run folder in place of RUN_DIR
        assert cmd[1:] == ["-m", "pipeline", "evaluate", "--config", "c.yaml", "--run-dir",
                           str(work / "comparison" / f"{row}-seed0"), "--seed", "0", f"--x.{row}", "1", "--force"]
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(rows.subprocess, "run", fake_run)
    assert rows.refresh_costs("comparison", work) == 1
    assert len(calls) == 2  # vp and cp were evaluated again; lcp has no folder
    vp = json.loads(rows.record_path("comparison", "vp", 0).read_text())
    assert vp["summary"]["peak_memory"] == 4096 and vp["summary"]["energy_uj"] == 12.5 and "summary_commit" in vp
    assert "summary" not in json.loads(rows.record_path("comparison", "cp", 0).read_text())  # accuracy differs
    assert rows.refresh_costs("comparison", work) == 0  # a record with a summary is left alone


SLEEPER = """import os, sys, time
from pathlib import Path
Path(sys.argv[1], "pid").write_text(str(os.getpid()))
time.sleep(600)
"""

DRIVER = """import sys
from pathlib import Path
from benchmarks import rows
rows.RESULTS = Path(sys.argv[1]) / "results"
rows.commands_for = lambda spec, table, row, seed, run_dir, extra=None: [[sys.executable, "-c", {sleeper!r}, str(run_dir)]]
sys.argv = ["rows.py", "run", "methods", "--rows", "nonn_k2,kd,scratch", "--seeds", "0", "--parallel", "2",
            "--work", str(Path(sys.argv[1]) / "work")]
rows.main()
"""


@pytest.mark.slow
def test_sigterm_on_rows_stops_its_running_rows_and_starts_no_other(tmp_path):
    """`kill` on rows.py used to leave its trainings running, orphaned; now they stop with it (real
    processes, real signals; the rows' commands are stand-ins that sleep)."""
    driver = subprocess.Popen([sys.executable, "-c", DRIVER.format(sleeper=SLEEPER), str(tmp_path)],
                              cwd=rows.ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=dict(os.environ, PYTHONPATH=str(rows.ROOT)))
    work = tmp_path / "work" / "methods"
    pid_files = [work / "nonn_k2-seed0" / "pid", work / "kd-seed0" / "pid"]
    deadline = time.monotonic() + 120
    while not all(p.exists() and p.read_text() for p in pid_files) and driver.poll() is None:
        assert time.monotonic() < deadline, "the two parallel rows never started"
        time.sleep(0.05)
    pids = [int(p.read_text()) for p in pid_files]
    driver.send_signal(signal.SIGTERM)
    out, _ = driver.communicate(timeout=120)
    assert driver.returncode == 143, out
    assert "stopped; a row that was running stopped with it" in out
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not (work / "scratch-seed0").exists(), "the queued third row started after the stop"
    assert not list((tmp_path / "results").rglob("*.json")), "a stopped row wrote a record"
