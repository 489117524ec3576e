from pathlib import Path

import pytest

from pipeline.config import DEFAULTS, ConfigError, load_config, parse_overrides
from tests.conftest import TINY


def test_overrides_are_parsed_as_yaml_values():
    assert parse_overrides(["--distill.epochs", "3", "--data.hflip=false", "--distill.students", "[a, b]"]) == [
        ("distill.epochs", 3), ("data.hflip", False), ("distill.students", ["a", "b"])]


def test_overrides_merge_into_loss_options_and_null_removes_one():
    losses = load_config(None, ["--distill.losses.kd.alpha", "0.5"])["distill"]["losses"]
    assert losses == {"kd": {"alpha": 0.5, "temperature": 4.0}, "filter_transfer_per_student": {"beta": 1.0e4}}
    losses = load_config(None, ["--distill.losses.filter_transfer_per_student", "null",
                                "--distill.losses.attention_map.beta", "5"])["distill"]["losses"]
    assert losses == {"kd": {"alpha": 0.9, "temperature": 4.0}, "attention_map": {"beta": 5}}
    whole = load_config(None, ["--distill.losses", "{ce: {}}"])["distill"]["losses"]
    assert whole == {"ce": {}}, "naming the mapping itself replaces it"
    assert load_config(None, ["--data.synthetic", "{num_classes: 3}"])["data"]["synthetic"]["train_size"] == 512
    with pytest.raises(ConfigError, match="'data.hflip' is not a mapping"):
        load_config(None, ["--data.hflip.x", "1"])


def test_override_without_value_is_refused():
    with pytest.raises(ConfigError, match="has no value"):
        parse_overrides(["--distill.epochs"])


def test_profile_and_override_layering(tmp_path: Path):
    base = tmp_path / "base.yaml"
    base.write_text("name: base\nteacher: {epochs: 7}\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\nname: child\n")
    config = load_config(child, ["--teacher.arch", "resnet20"])
    assert (config["name"], config["teacher"]["epochs"], config["teacher"]["arch"]) == ("child", 7, "resnet20")
    assert config["distill"]["epochs"] == DEFAULTS["distill"]["epochs"]


def test_unknown_key_names_the_file_and_key(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: {epoch: 3}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'teacher.epoch'"):
        load_config(bad)


def test_unknown_override_key_is_refused():
    with pytest.raises(ConfigError, match="command-line override: unknown config key 'distill.epochz'"):
        load_config(None, ["--distill.epochz", "1"])


def test_bad_choice_and_missing_file():
    with pytest.raises(ConfigError, match="partition.mode"):
        load_config(None, ["--partition.mode", "clever"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("configs/nope.yaml")


@pytest.mark.parametrize("path", sorted(Path(__file__).resolve().parents[1].glob("configs/**/*.yaml")))
def test_every_shipped_config_loads(path: Path):
    load_config(path)


def test_exponent_floats_are_numbers_in_overrides_and_files(tmp_path: Path):
    assert load_config(None, ["--distill.lr", "1e-3"])["distill"]["lr"] == 0.001
    profile = tmp_path / "p.yaml"
    profile.write_text("teacher: {lr: 5e-2}\n")
    assert load_config(profile)["teacher"]["lr"] == 0.05


@pytest.mark.parametrize("override,message", [
    (["--teacher.lr", "abc"], "teacher.lr = 'abc': expected int or float"),
    (["--data.hflip", "3"], "data.hflip = 3: expected bool"),
    (["--teacher.epochs", "2.5"], "teacher.epochs = 2.5: expected int"),
    (["--data.eval_batch_size", "0"], "data.eval_batch_size = 0: must be at least 1"),
    (["--partition.percentile", "abc"], "partition.percentile = 'abc'"),
    (["--partition.percentile", "100"], "partition.percentile = 100.0: must be in \\[0, 100\\)"),
    (["--partition.resolution", "-1"], "partition.resolution = -1.0: must be above 0"),
    (["--distill.student_dropout", "1"], "distill.student_dropout = 1.0: must be in \\[0, 1\\)"),
    (["--distill.students", "[wrn_10_1, wrn_10_9]"], "distill.students: unknown architecture 'wrn_10_9'"),
    (["--teacher.arch", "vgg"], "teacher.arch: unknown architecture 'vgg'"),
    (["--distill.losses", "{kd: {gamma: 1}}"], "distill.losses.kd: bad options"),
    (["--distill.losses", "{fitnet: {}}"], "unknown loss 'fitnet'"),
    (["--distill.losses", "[kd, ce]"], "distill.losses"),
    (["--distill.losses.kd.alpha", "abc"], "distill.losses.kd: .*alpha = 'abc' must be a finite number"),
    (["--seed", "-1"], "seed = -1: must be in \\[0, 2\\*\\*32\\)"),
    (["--data.split_seed", "4294967296"], "data.split_seed = 4294967296: must be in"),
    (["--method_options.vp", "[1, 2]"], "method_options.vp = \\[1, 2\\]: must be a mapping"),
    (["--data.dataset", "synthetic", "--data.synthetic.train_size", "100000000000"],
     "data.synthetic: 100000000000 training .* GiB to generate"),
    (["--data.synthetic.image_size", "2"], "data.synthetic.image_size = 2: must be at least 8"),
    (["--data.dataset", "synthetic", "--data.data_dir", "somewhere"], "data.data_dir = 'somewhere': the synthetic"),
])
def test_whole_config_is_checked_before_any_stage(override, message):
    """Types, ranges, architectures and loss options fail at load time, naming the key and the value."""
    with pytest.raises(ConfigError, match=message):
        load_config(None, override)


def test_non_utf8_config_is_one_line_error(tmp_path: Path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin1.yaml: not UTF-8 text"):
        load_config(bad)


def test_cli_refuses_bad_value_before_touching_the_run(tmp_path: Path, capsys):
    from pipeline.cli import main

    run_dir = tmp_path / "run"
    (run_dir / "teacher").mkdir(parents=True)
    kept = run_dir / "teacher" / "best.ckpt"
    kept.write_bytes(b"weights")
    assert main(["run", "--config", str(TINY), "--run-dir", str(run_dir),
                 "--teacher.lr", "abc"]) == 2
    assert "teacher.lr = 'abc'" in capsys.readouterr().err
    assert kept.read_bytes() == b"weights"


def test_missing_base_file_names_the_file_that_references_it(tmp_path: Path):
    child = tmp_path / "child.yaml"
    child.write_text("base: gone.yaml\n")
    with pytest.raises(ConfigError, match=r"child.yaml: its 'base' file .*gone.yaml not found"):
        load_config(child)


def test_a_full_disk_anywhere_names_the_run_folder_and_the_file(tmp_path: Path):
    """A bare ``[Errno 28]`` names neither the folder to clear nor the file it failed on."""
    import errno

    from pipeline.cli import _describe

    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "teacher" / "last.ckpt"))
    assert _describe(full, tmp_path) == (f"no space left on the disk holding {tmp_path} while writing "
                                         f"{tmp_path / 'teacher' / 'last.ckpt'}; free some space and rerun")
    assert _describe(ValueError("bad"), tmp_path) == "bad"
