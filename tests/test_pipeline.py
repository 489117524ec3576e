"""`nonn run` end to end on synthetic data, then what users rely on afterwards: the report, the
bundle reproducing the model, skipping finished stages, refusing mismatched inputs, resuming."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bundle.format import read_manifest
from core.io import sha256_file
from distill.modules import PLAN_KEY, NoNNModule
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.context import Context
from pipeline.fleet import Fleet
from pipeline.loading import load_trained
from pipeline.records import STAGES
from pipeline.stages import run_stage
from serve.mqtt import Broker, Link
from tests.conftest import ROOT, TINY

pytestmark = pytest.mark.slow  # the whole pipeline or real processes: `pytest -m 'not slow'` skips it


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("pipeline") / "run"
    assert main(["run", "--config", str(TINY), "--run-dir", str(run_dir)]) == 0
    return run_dir


def copy_run(finished_run, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(finished_run, target)
    return target


def rewrite_partition_record(run_dir: Path) -> None:
    """Make the partition stage's record agree with an edited partition.json (as if it had written it)."""
    record_path = run_dir / "stages" / "partition.json"
    record = json.loads(record_path.read_text())
    record["outputs"]["partition/partition.json"] = sha256_file(run_dir / "partition" / "partition.json")
    record_path.write_text(json.dumps(record))


def test_run_writes_every_artifact(finished_run):
    run_dir = finished_run
    for rel in ("config.yaml", "teacher/best.ckpt", "partition/partition.json", "partition/filter_graph.graphml",
                "partition/partition.png", "students/best.ckpt", "export/manifest.json", "report.json", "report.md",
                "failures.png"):
        assert (run_dir / rel).exists(), rel


def test_teacher_and_students_learn(finished_run):
    """4 synthetic classes (chance 25%): both stages must learn far above chance in two epochs."""
    report = json.loads((finished_run / "report.json").read_text())
    assert report["teacher"]["test_acc"] >= 0.8
    assert report["method"]["test_acc_bundle"] >= 0.7


def test_report_matches_the_bundle_and_lists_failures(finished_run):
    report = json.loads((finished_run / "report.json").read_text())
    nonn = report["method"]
    assert nonn["bundle_agreement"] == 1.0 and nonn["bundle_max_logit_diff"] < 1e-4
    assert nonn["test_acc_bundle"] == pytest.approx(nonn["test_acc_pytorch"])
    assert [f["missing"] for f in report["failures"]] == [[], [0], [1]]
    assert sum(d["output_width"] for d in nonn["devices"]) == 64  # every filter of the WRN-10-1 teacher
    assert all(d["bytes_sent_per_inference"] == 4 * d["output_width"] for d in nonn["devices"])
    mp = report["model_parallel"]  # the export stage's chain bundle, run in ONNX Runtime: the teacher's answers
    assert len(mp["devices"]) == 2 and mp["bytes_sent_between_devices"] > nonn["total_bytes_sent"]
    assert mp["test_acc"] == pytest.approx(report["teacher"]["test_acc"], abs=1.5 / report["test_images"])
    assert read_manifest(finished_run / "export_mp")[1]["topology"] == "chain"
    md = (finished_run / "report.md").read_text()
    assert "Device failures" in md and "model parallelism" in md


def test_rerun_redoes_nothing(finished_run, capsys):
    run_dir = finished_run
    stamps = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*.ckpt")}
    assert main(["run", "--config", str(TINY), "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert all(f"[nonn] {stage}: up to date" in out for stage in STAGES)
    assert stamps == {p: p.stat().st_mtime_ns for p in run_dir.rglob("*.ckpt")}


def test_changed_config_redoes_only_downstream_stages(finished_run, tmp_path, capsys):
    run_dir = copy_run(finished_run, tmp_path)
    assert main(["run", "--config", str(TINY), "--run-dir", str(run_dir), "--export.transport", "fp16",
                 "--export.int8_weights", "true"]) == 0
    out = capsys.readouterr().out
    assert "[nonn] distill: up to date" in out and "[nonn] export: running" in out
    assert "[nonn] evaluate: running" in out
    assert json.loads((run_dir / "export" / "manifest.json").read_text())["transport"]["name"] == "fp16"
    nonn = json.loads((run_dir / "report.json").read_text())["method"]
    assert nonn["transport"] == "fp16" and nonn["weights"] == "int8"
    assert all(d["model_file"].endswith("model.int8.onnx") for d in nonn["devices"])
    assert nonn["bundle_agreement"] > 0.9, "fp16 transport and int8 weights keep most predictions"


def test_distill_refuses_a_partition_from_another_teacher(finished_run, tmp_path, capsys):
    run_dir = copy_run(finished_run, tmp_path)
    path = run_dir / "partition" / "partition.json"
    data = json.loads(path.read_text())
    data["teacher_sha256"] = "0" * 64
    path.write_text(json.dumps(data))
    assert main(["distill", "--config", str(TINY), "--run-dir", str(run_dir), "--force"]) == 1
    assert "stage 'partition' in" in capsys.readouterr().err, "an edited output makes its stage out of date"
    rewrite_partition_record(run_dir)  # a consistent record for a partition of another teacher
    assert main(["distill", "--config", str(TINY), "--run-dir", str(run_dir), "--force"]) == 1
    assert "different teacher checkpoint" in capsys.readouterr().err


def test_later_stages_refuse_an_upstream_stage_out_of_date_with_the_config(finished_run, tmp_path, capsys):
    run_dir = copy_run(finished_run, tmp_path)
    for stage in ("distill", "export", "evaluate"):
        assert main([stage, "--config", str(TINY), "--run-dir", str(run_dir), "--partition.num_students", "3"]) == 1
        assert "stage 'partition' in" in capsys.readouterr().err
    (run_dir / "export" / "device_0" / "model.onnx").write_bytes(b"flipped")
    assert main(["evaluate", "--config", str(TINY), "--run-dir", str(run_dir)]) == 1
    assert "stage 'export' in" in capsys.readouterr().err
    assert main(["export", "--config", str(TINY), "--run-dir", str(run_dir)]) == 0, "export redoes itself"
    assert main(["evaluate", "--config", str(TINY), "--run-dir", str(run_dir)]) == 0


def test_distill_killed_midway_keeps_the_last_good_result_and_resumes(finished_run, tmp_path, crash_in_second_epoch,
                                                                      monkeypatch, capsys):
    """A changed config trains beside the finished students; they are replaced only when it succeeds."""
    run_dir = copy_run(finished_run, tmp_path)
    before = sha256_file(run_dir / "students" / "best.ckpt")
    config = load_config(TINY, ["--distill.epochs", "3"])
    ctx = Context(config, run_dir)
    crash_in_second_epoch(NoNNModule)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_stage(ctx, "distill")
    assert sha256_file(run_dir / "students" / "best.ckpt") == before, "the last good result survives"
    monkeypatch.undo()
    run_stage(ctx, "distill")
    assert "[nonn] distill: resuming from" in capsys.readouterr().out
    assert torch.load(run_dir / "students" / "last.ckpt", weights_only=True)["epoch"] == 2
    assert sha256_file(run_dir / "students" / "best.ckpt") != before
    assert not list(run_dir.glob(".students*")), "nothing left beside the students folder"


def test_a_resumed_distillation_ends_exactly_where_an_uninterrupted_one_does(finished_run, tmp_path,
                                                                              crash_in_second_epoch, monkeypatch):
    """The data order, the augmentation and the student dropout of epoch k do not depend on whether the run
    was restarted before it (Lightning restores weights, optimiser and schedule, not the random generators)."""
    config = load_config(TINY, ["--distill.epochs", "3", "--distill.student_dropout", "0.3"])
    uninterrupted = copy_run(finished_run, tmp_path / "a")
    run_stage(Context(config, uninterrupted), "distill")
    resumed = copy_run(finished_run, tmp_path / "b")
    crash_in_second_epoch(NoNNModule)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_stage(Context(config, resumed), "distill")
    monkeypatch.undo()
    run_stage(Context(config, resumed), "distill")
    a, b = (torch.load(r / "students" / "last.ckpt", weights_only=True)["state_dict"] for r in (uninterrupted, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads((r / "stages" / "distill.json").read_text())["results"] for r in (uninterrupted, resumed)]
    assert records[0]["test_acc"] == records[1]["test_acc"]


def test_export_sign_signs_every_bundle_and_a_device_given_the_key_refuses_any_other(finished_run, tmp_path, capsys):
    from bundle.format import verify_signature
    from tests.helpers import key_pair

    run_dir = copy_run(finished_run, tmp_path)
    private, public = key_pair(tmp_path, "ours")
    _, other = key_pair(tmp_path, "theirs")
    args = ["export", "--config", str(TINY), "--run-dir", str(run_dir)]
    assert main([*args, "--sign", str(tmp_path / "missing.pem")]) == 2  # refused before the stage runs
    assert "missing.pem: cannot read the private key" in capsys.readouterr().err
    assert main([*args, "--sign", str(private)]) == 0
    for folder in ("export", "export_mp"):
        verify_signature(run_dir / folder, public)
    credentials = tmp_path / "device_0.json"
    credentials.write_text(json.dumps({"username": "u", "password": "p"}))
    device = [sys.executable, "-m", "serve", "serve", "device", "--bundle", str(run_dir / "export"), "--index", "0",
              "--broker", "mqtt://127.0.0.1:9", "--credentials", str(credentials), "--public-key", str(other)]
    refused = subprocess.run(device, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert "manifest.sig does not verify with" in refused.stderr
    # nonn deploy checks the key itself and hands it to every process it starts
    deploy = ["deploy", "--run-dir", str(run_dir), "--limit", "8", "--drill-images", "0", "--no-progress"]
    assert main([*deploy, "--public-key", str(other)]) == 1
    assert "manifest.sig does not verify with" in capsys.readouterr().err
    assert main([*deploy, "--public-key", str(public)]) == 0
    fleet = Fleet(run_dir / "export", Broker("127.0.0.1", 9), {}, 50.0, Link(), tmp_path, public_key=public)
    assert fleet._command("device", "device_0")[-2:] == ["--public-key", str(public.resolve())]


def test_a_loss_that_becomes_non_finite_fails_the_stage_and_keeps_the_students(finished_run, tmp_path, capsys):
    run_dir = copy_run(finished_run, tmp_path)
    before = sha256_file(run_dir / "students" / "best.ckpt")
    assert main(["distill", "--config", str(TINY), "--run-dir", str(run_dir), "--force", "--distill.lr", "1e30"]) == 1
    err = capsys.readouterr().err
    assert "distill: the training loss became" in err and "the previous result, if any, is kept" in err, err
    assert sha256_file(run_dir / "students" / "best.ckpt") == before
    record = json.loads((run_dir / "stages" / "distill.json").read_text())
    assert record["results"]["test_acc"] > 0.5, "the finished stage's record still describes the kept students"


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True, check=True)
    assert "partition" in out.stdout and "evaluate" in out.stdout


def test_independent_script_reproduces_the_reported_accuracy(finished_run, tmp_path):
    from imagedata.data import ImageDataModule

    run_dir = finished_run
    dm = ImageDataModule(load_config(TINY)["data"], seed=0)
    dm.setup()
    import numpy as np
    np.save(tmp_path / "x.npy", dm.test[0].numpy())
    np.save(tmp_path / "y.npy", dm.test[1].numpy())
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce_accuracy.py"
    out = subprocess.run([sys.executable, str(script), str(run_dir / "export"), "--npy", str(tmp_path / "x.npy"),
                          str(tmp_path / "y.npy")], capture_output=True, text=True, check=True).stdout
    reported = json.loads((run_dir / "report.json").read_text())["method"]["test_acc_bundle"]
    assert f"accuracy {reported:.4f}" in out


def test_same_command_gives_the_same_students(finished_run, tmp_path):
    """Seeded and with deterministic algorithms, retraining gives bit-identical weights and accuracy."""
    run_dir = copy_run(finished_run, tmp_path)
    assert main(["distill", "--config", str(TINY), "--run-dir", str(run_dir), "--force"]) == 0
    weights = [torch.load(d / "students" / "best.ckpt", weights_only=True)["state_dict"]
               for d in (finished_run, run_dir)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    records = [json.loads((d / "stages" / "distill.json").read_text())["results"] for d in (finished_run, run_dir)]
    assert records[0]["test_acc"] == records[1]["test_acc"]


def test_export_uses_the_filter_lists_the_students_were_trained_on(finished_run, tmp_path, capsys):
    """A partition file edited after training (its record rewritten to match) is refused, not exported."""
    run_dir = copy_run(finished_run, tmp_path)
    trained = torch.load(run_dir / "students" / "best.ckpt", weights_only=True)[PLAN_KEY]["partitions"]
    manifest = json.loads((run_dir / "export" / "manifest.json").read_text())
    assert [d["teacher_filters"] for d in manifest["devices"]] == trained
    path = run_dir / "partition" / "partition.json"
    data = json.loads(path.read_text())
    data["partitions"] = [data["partitions"][0][::-1], data["partitions"][1]]  # same sizes, other order
    path.write_text(json.dumps(data))
    rewrite_partition_record(run_dir)
    assert main(["export", "--config", str(TINY), "--run-dir", str(run_dir), "--force"]) == 1
    assert "stage 'distill' in" in capsys.readouterr().err  # trained on another partition record
    ctx = Context(load_config(TINY), run_dir)
    with pytest.raises(RuntimeError, match="no longer lists the filters the students"):
        load_trained(ctx, ctx.datamodule())  # the checkpoint itself knows its filter lists


def test_validation_only_training_never_reads_the_test_set(finished_run, tmp_path, monkeypatch, capsys):
    """A sweep chooses by validation: with trainer.test false the distill stage trains and records its best
    validation accuracy without asking the data module for the test set."""
    from imagedata.data import ImageDataModule

    def refuse(self):
        raise AssertionError("the test set was read")

    monkeypatch.setattr(ImageDataModule, "test_dataloader", refuse)
    run_dir = copy_run(finished_run, tmp_path)
    assert main(["distill", "--config", str(TINY), "--run-dir", str(run_dir), "--distill.epochs", "1",
                 "--trainer.test", "false"]) == 0
    results = json.loads((run_dir / "stages" / "distill.json").read_text())["results"]
    assert results["test_acc"] is None and 0 < results["best_val_acc"] <= 1
    assert "(trainer.test: false)" in capsys.readouterr().out
