from pathlib import Path

import pytest

from distill.config import DEFAULTS, ConfigError, load_config, parse_overrides


def test_overrides_are_parsed_as_yaml_values():
    assert parse_overrides(["--distill.epochs", "3", "--data.hflip=false", "--distill.students", "[a, b]"]) == {
        "distill": {"epochs": 3, "students": ["a", "b"]}, "data": {"hflip": False}}


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
