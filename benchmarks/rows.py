"""Benchmark rows: run them, keep one JSON record per finished row, render every table from the records.

    python benchmarks/rows.py run TABLE [--rows A,B] [--seeds 0,1,2] [--work DIR] [--force]
                                        [--parallel N] [--set KEY=VALUE ...]
    python benchmarks/rows.py tables                      # rewrite the tables in benchmarks/README.md
    python benchmarks/rows.py pending [TABLE ...]         # the declared rows with no record yet
    python benchmarks/rows.py refresh-costs TABLE [--work DIR]   # peak memory and energy for older records

Rows and tables are declared in ``benchmarks/rows.yaml``. A row is ``nonn`` on one config with its
overrides and a seed, in ``WORK/TABLE/ROW-seedS`` (a row that was interrupted resumes there from
its last checkpoint). When it finishes, ``benchmarks/results/TABLE/ROW-seedS.json`` records the
resolved config, git commit, hardware, wall time, accuracies, per-device cost and the failure table.
A row with a record is not rerun unless ``--force``; SIGTERM or Ctrl-C on rows.py stops its running
rows with it (exit 143 / 130), and they resume when run again. ``--parallel N`` runs N rows side by side (a GPU
host trains these small models faster several at a time); ``--set trainer.num_threads=2`` adds an
override to every row of this invocation (it is kept in each record's resolved config). A row may
declare ``same_as: TABLE/ROW`` when it is exactly that experiment: it is never run, its records are
that row's. Tables are written between
``<!-- table:NAME -->`` and ``<!-- /table:NAME -->`` in the README, from the records alone.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO

import yaml

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "benchmarks" / "rows.yaml"
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "benchmarks" / "README.md"
sys.path.insert(0, str(ROOT))

from core.io import read_json, write_json_atomic, write_text_atomic  # noqa: E402
from core.processes import stop_processes  # noqa: E402
from core.signals import Terminated, sigterm_unwinds  # noqa: E402
from pipeline.compare import down_cell, failure_mean, mean_std, per_host_mean, summarize, table_lines, write_plots  # noqa: E402

PLOTS = RESULTS / "plots"


def load_spec() -> dict:
    return yaml.safe_load(SPEC.read_text())


def hardware() -> dict:
    """What the row ran on, so that timings are only ever compared like with like."""
    import torch

    from core.hardware import cpu_name
    from distill.precision import native_bf16

    info = {"cpu": cpu_name(), "cpu_cores": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16_cpu": native_bf16("cpu"), "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def git_commit() -> str:
    """HEAD (+dirty), or ``NONN_GIT_COMMIT`` for a copy of the tree shipped without its .git (a GPU host)."""
    if os.environ.get("NONN_GIT_COMMIT"):
        return os.environ["NONN_GIT_COMMIT"]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    commit = git("rev-parse", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def record_path(table: str, row: str, seed: int) -> Path:
    return RESULTS / table / f"{row}-seed{seed}.json"


def commands_for(spec: dict, table: str, row: str, seed: int, run_dir: Path,
                 extra: dict | None = None) -> list[list[str]]:
    """The ``nonn`` commands of one row: the table's stages (default: ``run``), same options each. The
    committed teacher is used unless the table names its own (``teacher: null`` trains one)."""
    t, r = spec["tables"][table], spec["tables"][table]["rows"][row]
    options = ["--config", r["config"], "--run-dir", str(run_dir), "--seed", str(seed),
               "--trainer.progress_bar", "false"]
    teacher = t.get("teacher", spec.get("teacher"))
    if teacher:
        options += ["--teacher.checkpoint", teacher]
    for overrides in (t.get("overrides", {}), r.get("overrides", {}), extra or {}):
        for key, value in overrides.items():
            options += [f"--{key}", yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...")]
    return [[sys.executable, "-m", "pipeline", stage, *options] for stage in t.get("stages", ["run"])]


def make_record(spec: dict, table: str, row: str, seed: int, run_dir: Path, seconds: float,
                cmds: list[list[str]]) -> dict:
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    distill = read_json(run_dir / "stages" / "distill.json", "distill record")["results"]
    record = {"table": table, "row": row, "label": spec["tables"][table]["rows"][row]["label"], "seed": seed,
              "commands": [" ".join(["nonn", *c[3:]]).replace(str(run_dir), "RUN_DIR") for c in cmds],
              "git_commit": git_commit(),
              "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "hardware": hardware(),
              "wall_seconds": round(seconds, 1), "distill": distill, "config": config}
    if not spec["tables"][table].get("validation_only"):
        report = read_json(run_dir / "report.json", "report")
        n = report["method"]
        record["test_acc"] = n["test_acc_bundle"]
        record["teacher"] = {k: report["teacher"][k] for k in ("arch", "test_acc", "params", "macs")}
        record["method"] = n["name"]
        record["bytes_sent"] = n["total_bytes_sent"]  # between devices (a chain's last device returns the answer)
        record["devices"] = [{k: d[k] for k in ("arch", "output_width", "params", "macs", "bytes_sent_per_inference",
                                                 "onnx_latency_ms")} for d in n["devices"]]
        record["failures"] = report["failures"]
        record["summary"] = summarize(report)  # the comparison row (nonn compare's), peak memory and energy included
    else:
        record["distill"].pop("test_acc", None)  # a sweep chooses by validation; the test set stays unseen
    return record


_print_lock = threading.Lock()


class Children:
    """The row processes running now. SIGTERM or Ctrl-C on rows.py stops them with it; otherwise a killed
    rows.py leaves its trainings running unseen, and a second rows.py would train the same folder."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: set[subprocess.Popen] = set()
        self.stopped = False

    def run(self, cmd: list[str], log: IO[str]) -> int:
        """``cmd``'s exit code; -SIGTERM without starting it once ``stop`` was called."""
        with self.lock:
            if self.stopped:
                return -signal.SIGTERM
            process = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            self.running.add(process)
        try:
            return process.wait()
        finally:
            with self.lock:
                self.running.discard(process)

    def stop(self, grace_s: float = 60.0) -> None:
        """SIGTERM to every child (a training stops at its next step, its finished epochs kept), SIGKILL to
        one still running after ``grace_s``; no child starts after this."""
        with self.lock:
            self.stopped = True
            processes = list(self.running)
        stop_processes(processes, grace_s)


children = Children()


def say(message: str) -> None:
    with _print_lock:
        print(f"[rows] {message}", flush=True)


def run_one(spec: dict, table: str, row: str, seed: int, work: Path, extra: dict) -> bool:
    """Run one row in its own folder (resuming it) and write its record; False when it failed."""
    run_dir = work / table / f"{row}-seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    cmds = commands_for(spec, table, row, seed, run_dir, extra)
    say(f"{table}/{row} seed {seed}: {' '.join(cmds[-1][1:])}")
    start = time.perf_counter()
    with open(run_dir / "rows.log", "a") as log:
        code = next((c for cmd in cmds if (c := children.run(cmd, log))), 0)
    seconds = time.perf_counter() - start
    if code != 0:
        say(f"{table}/{row} seed {seed}: failed (exit {code}), see {run_dir / 'rows.log'}")
        return False
    out = record_path(table, row, seed)
    write_json_atomic(out, make_record(spec, table, row, seed, run_dir, seconds, cmds))
    say(f"{table}/{row} seed {seed}: done in {seconds:.0f} s -> {out.relative_to(ROOT)}")
    return True


def pending_rows(spec: dict, table: str, rows: list[str] | None, seeds: list[int] | None, force: bool,
                 verbose: bool = True) -> list[tuple[str, int]]:
    """The (row, seed) pairs of ``table`` still to run: declared (or asked for), not ``same_as``, and without
    a record unless ``force``."""
    if table not in spec["tables"]:
        sys.exit(f"rows.py: unknown table {table!r}; {SPEC} has: {', '.join(spec['tables'])}")
    t = spec["tables"][table]
    pending = []
    for row in rows or list(t["rows"]):
        if row not in t["rows"]:
            sys.exit(f"rows.py: table {table!r} has no row {row!r}; it has: {', '.join(t['rows'])}")
        if t["rows"][row].get("same_as"):
            if verbose:
                say(f"{table}/{row}: the records of {t['rows'][row]['same_as']} (same experiment); not run here")
            continue
        for seed in seeds if seeds is not None else t["rows"][row].get("seeds", [0]):
            out = record_path(table, row, seed)
            if out.exists() and not force:
                if verbose:
                    say(f"{table}/{row} seed {seed}: recorded in {out.relative_to(ROOT)}")
            else:
                pending.append((row, seed))
    return pending


def print_pending(tables: list[str]) -> int:
    """Print, per table, the declared rows that have no record yet and the command that runs them; returns
    how many (row, seed) pairs are pending."""
    spec = load_spec()
    total = 0
    for table in tables or list(spec["tables"]):
        pending = pending_rows(spec, table, None, None, force=False, verbose=False)
        total += len(pending)
        if not pending:
            print(f"{table}: every declared row has its records")
            continue
        by_row: dict[str, list[int]] = {}
        for row, seed in pending:
            by_row.setdefault(row, []).append(seed)
        print(f"{table}: {len(pending)} pending")
        for row, row_seeds in by_row.items():
            print(f"  python benchmarks/rows.py run {table} --rows {row} --seeds {','.join(map(str, row_seeds))}")
    return total


def run_rows(table: str, rows: list[str] | None, seeds: list[int] | None, work: Path, force: bool,
             parallel: int = 1, extra: dict | None = None) -> bool:
    """Run the rows that have no record yet, ``parallel`` at a time; True when none failed."""
    spec = load_spec()
    pending = pending_rows(spec, table, rows, seeds, force)
    pool = ThreadPoolExecutor(max_workers=max(1, parallel))
    try:
        futures = [pool.submit(run_one, spec, table, row, seed, work, extra or {}) for row, seed in pending]
        return all([future.result() for future in futures])
    except (Terminated, KeyboardInterrupt):  # no new row, and the running ones stop too
        pool.shutdown(wait=False, cancel_futures=True)
        children.stop()
        raise
    finally:
        pool.shutdown()


def refresh_costs(table: str, work: Path) -> int:
    """Add the comparison row (``summary``: peak memory and energy included) to the records written before
    it existed: each record's run folder under ``work`` is evaluated again with this code (``nonn evaluate
    --force``; nothing is trained) and the record gains ``summary`` and ``summary_commit``. A record
    whose run folder is gone, or whose accuracy would change, is left as it was. Returns how many
    records changed."""
    changed = 0
    for path in sorted((RESULTS / table).glob("*.json")):
        record = json.loads(path.read_text())
        run_dir = work / table / f"{record['row']}-seed{record['seed']}"
        if "summary" in record or "test_acc" not in record or not (run_dir / "report.json").exists():
            continue
        # the record's own last command (rows.yaml may have changed since), as the evaluate stage
        words = [str(run_dir) if w == "RUN_DIR" else w for w in record["commands"][-1].split()]
        cmd = [sys.executable, "-m", "pipeline", "evaluate", *words[2:]]
        with open(run_dir / "rows.log", "a") as log:
            if subprocess.run([*cmd, "--force"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode:
                say(f"{path.name}: evaluate failed, see {run_dir / 'rows.log'}; record unchanged")
                continue
        report = read_json(run_dir / "report.json", "report")
        if report["method"]["test_acc_bundle"] != record["test_acc"]:
            say(f"{path.name}: the run folder evaluates to {report['method']['test_acc_bundle']}, the record says "
                f"{record['test_acc']}; not the same run, record unchanged")
            continue
        record["summary"], record["summary_commit"] = summarize(report), git_commit()
        write_json_atomic(path, record)
        changed += 1
        say(f"{path.name}: summary added (peak memory {record['summary']['peak_memory']:,} B)")
    return changed


def parse_sets(items: list[str]) -> dict:
    """``--set key=value`` options (value in YAML) as an overrides mapping."""
    extra = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            sys.exit(f"rows.py: --set {item!r}: expected KEY=VALUE, e.g. --set trainer.num_threads=2")
        extra[key] = yaml.safe_load(value)
    return extra


# --- tables ------------------------------------------------------------------------------------

def records(table: str) -> dict[str, list[dict]]:
    """The records of one table by row, rows in the order ``rows.yaml`` declares them, each under the label
    ``rows.yaml`` gives its row now (a record keeps the label it ran under); a ``same_as`` row takes the other
    row's records."""
    rows = load_spec()["tables"][table]["rows"]
    by_row: dict[str, list[dict]] = {}
    for path in sorted((RESULTS / table).glob("*.json")):
        r = json.loads(path.read_text())
        label = rows[r["row"]]["label"] if r["row"] in rows else r["label"]
        by_row.setdefault(r["row"], []).append({**r, "label": label})
    for row, r in rows.items():
        if r.get("same_as"):
            other_table, other_row = r["same_as"].split("/")
            others = records(other_table).get(other_row, [])
            if others:
                by_row[row] = [{**o, "label": r["label"]} for o in others]
    order = list(rows)
    return dict(sorted(by_row.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order)))


def pct(values: list[float]) -> str:
    """Mean (± sample std over seeds when there are several), in percent."""
    return mean_std(values, 100)


def losses_text(config: dict) -> str:
    """The losses and their options in a few words: numbers short (1e+04), names as they are (cosine)."""
    def value(v: object) -> str:
        return f"{v:g}" if isinstance(v, (int, float)) else str(v)
    return ", ".join(f"{name} {' '.join(f'{k}={value(v)}' for k, v in (opts or {}).items())}".strip()
                     for name, opts in config["distill"]["losses"].items())


def machine(record: dict) -> str:
    """The machine a row ran on, in a few words: the GPU host ("H100 host"), or the CPU with its vector
    capability ("AMD EPYC AVX2"): one CPU name has stood for machines twice as fast as each other."""
    hw = record["hardware"]
    if hw.get("gpu"):
        return f"{hw['gpu'].removeprefix('NVIDIA ').split()[0]} host"
    cpu = " ".join(w for w in hw["cpu"].replace("(R)", "").replace("(TM)", "").split() if w not in ("Processor", "CPU"))
    return " ".join(filter(None, (cpu, hw.get("cpu_capability"))))


def one_machine(by_row: dict[str, list[dict]]) -> bool:
    """Whether every record of a table (``records(table)``) ran on one machine (then its cells need not name
    it)."""
    return len({machine(r) for rs in by_row.values() for r in rs}) <= 1


def host(record: dict, alone: bool = False) -> str:
    """The machine as a cell names it: "CPU" when ``alone`` (the table's only machine, a CPU; the hardware
    line names it in full), else ``machine(record)``, so that a table mixing machines says which is which."""
    return "CPU" if alone and not record["hardware"].get("gpu") else machine(record)


def per_host(rs: list[dict], value, fmt: str, unit: str = "", alone: bool = False) -> str:
    """Mean of ``value(record)`` per machine (``pipeline.compare.per_host_mean``)."""
    return per_host_mean([(host(r, alone), value(r)) for r in rs], fmt, unit)


def epoch_seconds(rs: list[dict], alone: bool = False) -> str:
    """Training wall time per epoch (fit only: no partition, export or evaluation), over the epochs the
    last invocation trained (a resumed row trained fewer; one resumed after its training ended trained
    none and has no time to give)."""
    def per_epoch(r: dict) -> float | None:
        epochs = r["distill"].get("fit_epochs", r["distill"]["epochs"])
        return r["distill"]["fit_seconds"] / epochs if epochs else None
    return per_host(rs, per_epoch, ".0f", " s", alone)


def sweep_table(spec: dict, table: str) -> list[str]:
    lines = ["| row | losses | precision | epochs | seeds | best validation accuracy (%) | training time per epoch |",
             "|---|---|---|---|---|---|---|"]
    by_row = records(table)
    alone = one_machine(by_row)
    for _row, rs in by_row.items():
        c = rs[0]["config"]
        lines.append(f"| {rs[0]['label']} | {losses_text(c)} | {rs[0]['distill']['precision']} | "
                     f"{c['distill']['epochs']} | {len(rs)} | {pct([r['distill']['best_val_acc'] for r in rs])} | "
                     f"{epoch_seconds(rs, alone)} |")
    return lines


def teachers_table() -> list[str]:
    """The committed teachers, from the records beside their weights."""
    lines = ["| teacher | dataset | epochs | precision | test accuracy (%) | best val (%) | training time | sha256 |",
             "|---|---|---|---|---|---|---|---|"]
    for path in sorted((ROOT / "benchmarks" / "teachers").glob("*.json")):
        t = json.loads(path.read_text())
        lines.append(f"| `{t['file']}` ({t['arch']}) | {t['dataset']} | {t['teacher']['epochs']} | {t['precision']} | "
                     f"{100 * t['test_acc']:.2f} | {100 * t['best_val_acc']:.2f} | {t['fit_seconds'] / 60:.0f} min on "
                     f"{t['hardware']['cpu']}, {t['hardware']['cpu_cores']} cores | `{t['sha256'][:12]}...` |")
    return lines


def method_table(spec: dict, table: str) -> list[str]:
    lines = ["| method | test accuracy (%) | seeds | best val (%) | params per device | MACs per device | "
             "bytes sent per inference | 1 device down (%) | 2 devices down (%) | training time per epoch |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    by_row = records(table)
    teacher, alone = None, one_machine(by_row)
    for _row, rs in by_row.items():
        r0 = rs[0]
        teacher = teacher or r0["teacher"]
        devices = r0["devices"]
        downs = [down_cell([failure_mean(r["failures"], n) for r in rs], n, len(devices)) for n in (1, 2)]
        lines.append(f"| {r0['label']} | {pct([r['test_acc'] for r in rs])} | {len(rs)} | "
                     f"{pct([r['distill']['best_val_acc'] for r in rs])} | {max(d['params'] for d in devices):,} | "
                     f"{max(d['macs'] for d in devices) / 1e6:.2f} M | "
                     f"{sum(d['bytes_sent_per_inference'] for d in devices)} B | {downs[0]} | {downs[1]} | "
                     f"{epoch_seconds(rs, alone)} |")
    if teacher:
        lines.insert(2, f"| teacher {teacher['arch']} | {100 * teacher['test_acc']:.2f} | - | - | "
                        f"{teacher['params']:,} | {teacher['macs'] / 1e6:.2f} M | - | - | - | - |")
    return lines


def bytes_sent(record: dict) -> int:
    """Bytes between devices per inference; records older than the ``bytes_sent`` field are all star
    topologies (every device sends its vector to the aggregator), where it is the devices' sum."""
    return record.get("bytes_sent", sum(d["bytes_sent_per_inference"] for d in record["devices"]))


def record_summary(record: dict, alone: bool = False) -> dict:
    """A record as ``nonn compare``'s row. Records older than the ``summary`` field are read through the
    same function from the fields they kept; they have no peak memory or energy."""
    if "summary" in record:
        return record["summary"] | {"label": record["label"], "host": host(record, alone)}
    chain = record.get("method") == "mp"
    report = {"run": record["config"]["name"], "dataset": record["config"]["data"]["dataset"],
              "failures": record["failures"],
              "method": {"name": record.get("method", record["row"]), "label": record["label"],
                         "devices": record["devices"], "test_acc_bundle": record["test_acc"],
                         "total_bytes_sent": bytes_sent(record), "topology": "chain" if chain else "gather"}}
    return summarize(report) | {"host": host(record, alone)}


def comparison_groups(table: str) -> list[list[dict]]:
    by_row = records(table)
    alone = one_machine(by_row)
    return [[record_summary(r, alone) for r in rs] for rs in by_row.values()]


def comparison_table(spec: dict, table: str) -> list[str]:
    """Every way to split the model, side by side (``nonn compare``'s table): accuracy, the largest device's
    size, compute, memory and ONNX Runtime time, energy, what crosses the network, and what failures cost."""
    return table_lines(comparison_groups(table))


def hardware_line(table: str) -> str:
    seen = sorted({(r["hardware"]["cpu"], r["hardware"].get("cpu_capability", ""), r["hardware"]["cpu_cores"],
                    r["hardware"].get("gpu", ""), r["distill"].get("precision", "not trained"))
                   for rs in records(table).values() for r in rs})
    return "Ran on: " + "; ".join(f"{cpu}{f' ({cap})' if cap else ''}, {cores} cores{', ' + gpu if gpu else ''}, {prec}"
                                  for cpu, cap, cores, gpu, prec in seen) + "."


RENDERERS = {"sweep": sweep_table, "methods": method_table, "comparison": comparison_table}


def render_tables() -> None:
    spec = load_spec()
    text = README.read_text()
    blocks = {"teachers": teachers_table()}
    for table, t in spec["tables"].items():
        body = RENDERERS[t["kind"]](spec, table)
        blocks[table] = [*body, "", hardware_line(table)] if len(body) > 2 else ["(no records yet)"]
    for table, t in spec["tables"].items():
        if t["kind"] == "comparison" and records(table):
            write_plots(comparison_groups(table), PLOTS / table, f"{table} (benchmarks/results/{table})")
    for name, body in blocks.items():
        begin, end = f"<!-- table:{name} -->", f"<!-- /table:{name} -->"
        if begin not in text or end not in text:
            print(f"[rows] {README.name} has no {begin} ... {end} block; table {name} not written")
            continue
        head, rest = text.split(begin, 1)
        text = head + "\n".join([begin, "", *body, "", end]) + rest.split(end, 1)[1]
    write_text_atomic(README, text)
    print(f"[rows] tables written to {README}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the rows of one table that have no record yet")
    run.add_argument("table")
    run.add_argument("--rows", help="comma-separated row names (default: all)")
    run.add_argument("--seeds", help="comma-separated seeds (default: each row's own)")
    run.add_argument("--work", type=Path, default=ROOT / "runs" / "bench", help="where the run folders go")
    run.add_argument("--force", action="store_true", help="rerun rows that have a record")
    run.add_argument("--parallel", type=int, default=1, help="rows run side by side (default 1)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="an override for every row of this invocation, e.g. trainer.num_threads=2")
    sub.add_parser("tables", help="rewrite the tables in benchmarks/README.md from the records")
    pending = sub.add_parser("pending", help="list the declared rows that have no record yet, with the command "
                             "that runs each")
    pending.add_argument("tables", nargs="*", help="tables to list (default: all)")
    refresh = sub.add_parser("refresh-costs", help="add peak memory and energy to older records of TABLE by "
                             "evaluating their run folders again (nothing is trained)")
    refresh.add_argument("table")
    refresh.add_argument("--work", type=Path, default=ROOT / "runs" / "bench", help="where the run folders are")
    args = parser.parse_args()
    try:
        with sigterm_unwinds():
            sys.exit(dispatch(args))
    except (Terminated, KeyboardInterrupt) as stop:
        say("stopped; a row that was running stopped with it and resumes from its folder when run again")
        sys.exit(143 if isinstance(stop, Terminated) else 130)


def dispatch(args: argparse.Namespace) -> int:
    """Run one subcommand; its exit code."""
    if args.command == "run":
        ok = run_rows(args.table, args.rows.split(",") if args.rows else None,
                      [int(s) for s in args.seeds.split(",")] if args.seeds else None, args.work, args.force,
                      args.parallel, parse_sets(args.set))
        return 0 if ok else 1
    if args.command == "pending":
        print_pending(args.tables)
    elif args.command == "refresh-costs":
        say(f"{refresh_costs(args.table, args.work)} record(s) of {args.table} refreshed")
    else:
        render_tables()
    return 0


if __name__ == "__main__":
    main()
