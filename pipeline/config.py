"""Configs: built-in defaults, a YAML profile on top, dotted command-line overrides on top of that.

Every key a profile or override may set is in :data:`DEFAULTS`; anything else is refused with the
file (or option) that named it, so a typo never silently does nothing.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

from bundle.format import TRANSPORTS
from bundle.signing import load_private_key
from core.energy import EnergyModel
from core.hardware import memory_bytes
from distill.losses import build_losses
from distill.modules import SCHEDULES
from distill.tracking import WANDB_MODES
from imagedata.datasets import DATASETS, synthetic_peak_bytes
from methods import METHODS, Method
from partitioning.activations import POOLINGS
from partitioning.communities import PARTITION_MODES
from partitioning.graph import EDGE_RULES
from serve import defaults
from students.registry import ARCHITECTURES

DEFAULTS: dict[str, Any] = {
    "name": "nonn",              # run name: W&B group and default run folder name
    "seed": 0,
    "run_dir": None,             # default: runs/<name>
    "method": "nonn",            # how the model is split across devices: nonn | single | lcp | vp | cp | mp (methods/)
    "method_options": {},        # <method>: {option: value}; each method's options and defaults are in its file
    "data": {
        "dataset": "fashion_mnist",  # fashion_mnist | cifar10 | cifar100 | imagefolder | synthetic
        "data_dir": None,            # where the files are / go; default: the dataset's standard place. cifar10/100
                                     # also read an image-folder copy (a folder or .zip of train/<class>/,
                                     # test/<class>/); imagefolder needs it (optional val/<class>/ = validation)
        "download": True,            # fetch the official files (checksummed) when none are found
        "val_size": 5000,            # images held out of the training set (unless the data set has a val split)
        "split_seed": 0,             # seeds the train/validation split; fixed apart from the run's seed so that
                                     # every run (and every seed) splits the data as the teacher did
        "train_subset": None,        # use only this many training images (quick profiles)
        "test_subset": None,
        "batch_size": 128,
        "eval_batch_size": 512,
        "crop_padding": 2,           # random crop with this much zero padding; 0 = off
        "hflip": True,
        "synthetic": {"train_size": 512, "test_size": 256, "image_size": 16, "channels": 1,
                      "num_classes": 4},
    },
    "trainer": {
        "accelerator": "auto",
        "processes": 1,              # training processes per node: CPU processes, or one per GPU; > 1 with strategy ddp
                                     # (Lightning calls them "devices"; here a device is always an IoT node)
        "strategy": "auto",          # ddp: data-parallel, one process per CPU core group or GPU, each its own shard of the data
        "num_nodes": 1,
        "precision": "32-true",      # auto = bf16-mixed where bf16 was measured faster (distill/precision.py),
                                     # else 32-true; bf16 asked for without native bf16 falls back to 32-true (warning)
        "channels_last": True,
        "deterministic": True,       # deterministic algorithms: the same command on the same machine, the same numbers
        "num_threads": None,         # torch CPU threads; default: torch's choice
        "limit_train_batches": None,  # cap batches per epoch (tests, quick profiles)
        "limit_val_batches": None,
        "progress_bar": True,
        "profile": False,            # time every training hook (Lightning's SimpleProfiler): <stage>/profile.json
                                     # and profile-fit.txt; benchmarks/profile_epoch.py turns it into a table
        "test": True,                # test the best checkpoint after each training stage; false for runs that
                                     # choose by validation (sweeps), so that they never read the test set
    },
    "teacher": {
        "arch": "wrn_16_2",
        "checkpoint": None,          # use this trained teacher (a best.ckpt) instead of training one
        "epochs": 30,
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 5.0e-4,
        "nesterov": True,
        "schedule": "cosine",        # cosine | cosine_steps | step
        "milestones": [0.5, 0.75],   # step schedule: fractions of the run at which lr drops 10x
    },
    "partition": {
        "num_students": 2,
        "pooling": "mean",           # mean | max
        "edge_rule": "activation_hub",  # activation_hub | coactivation | pearson
        "top_k": 50,
        "percentile": 99.0,
        "resolution": 0.7,
        "mode": "balanced",          # balanced | prototype | random | contiguous
        "capacities": None,          # relative device capacities, one per student (balanced mode)
        "split_largest": False,      # prototype mode: split the largest group when K is too large
        "max_images": None,          # cap on validation images read
    },
    "distill": {
        "students": ["wrn_10_1"],    # one name for all students, or one per student
        "epochs": 30,
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 5.0e-4,
        "nesterov": True,
        "schedule": "cosine",
        "milestones": [0.5, 0.75],
        "losses": None,              # name -> options (distill/losses.py); null: the method's own defaults
                                     # (its ``default_losses``: NoNN's in methods/base.py)
        "student_dropout": 0.0,      # probability of dropping each student's vector in training
        "teacher_pool": {            # the teacher's outputs computed once for V stored views per training image
            "views": 0,              # V; 0 = off (the teacher runs on every step); see distill/pool.py
            "seed": 0,               # seeds the stored views (not the run's seed: every seed can share one pool)
            "dir": None,             # a folder runs share: each pool in <dir>/<key digest>/, reused by every run
                                     # with the same key (seeds, rows); default: <run>/teacher_pool
        },
    },
    "export": {
        "transport": "fp32",         # fp32 | fp16 | int8: how device vectors travel
        "int8_weights": False,       # dynamic int8 weight quantisation with ONNX Runtime
        "opset": 17,
        "sign_key": None,            # an Ed25519 private key (PEM): sign each bundle's manifest (manifest.sig;
                                     # bundle/signing.py); --sign KEY on nonn export / run
    },
    "evaluate": {
        "max_failure_subsets": 32,   # beyond K <= 4, this many random subsets per failure count
        "energy": {                  # the energy estimate's model (core/energy.py; README "Energy")
            "compute": "cpu_core",   # cpu_core | fp32_arith | int8_arith: the devices' pJ per MAC
            "link": "wifi",          # wifi | bluetooth: nJ per bit sent or received
            "pj_per_mac": None,      # a number replaces the compute class's own
            "nj_per_bit": None,      # a number replaces the link class's own
        },
    },
    "deploy": {                      # nonn deploy (its options override these)
        "deadline_ms": defaults.DEADLINE_MS,    # the aggregator answers with the devices in by then
        "window": defaults.WINDOW,              # requests in flight in the throughput phase
        "drill_images": defaults.DRILL_IMAGES,  # images streamed in the fault drill (0: no drill)
        "drill_device": defaults.DRILL_DEVICE,  # the device the drill kills
    },
    "wandb": {
        "mode": "auto",              # auto (online with an API key, else offline) | online | offline | disabled
        "project": "nonn",
        "entity": None,
    },
}

# Keys whose value is an open mapping (any sub-keys allowed).
OPEN_KEYS = {"distill.losses", "method_options"}
# Keys that take several types (everything else must have the type of its default, when that is not None).
FREE_TYPES = {"trainer.processes": (int, str, list), "trainer.precision": (str, int)}


class _Loader(yaml.SafeLoader):
    """YAML with 1.2-style floats: ``1e-3`` is a number (PyYAML's 1.1 rules read it as a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
               r"|[0-9][0-9_]*[eE][-+]?[0-9]+|\.inf|\.Inf|\.INF|\.nan|\.NaN|\.NAN)$"),
    list("-+0123456789."))


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


class ConfigError(ValueError):
    """A config file or override names something that does not exist or has the wrong type."""


def _merge(base: dict, update: dict, source: str, prefix: str = "") -> None:
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key not in base:
            raise ConfigError(f"{source}: unknown config key '{dotted}'; known keys here: "
                              f"{', '.join(base) or '(none)'}")
        if isinstance(base[key], dict) and dotted not in OPEN_KEYS:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{dotted}' must be a mapping, got {value!r}")
            _merge(base[key], value, source, dotted + ".")
        else:
            base[key] = copy.deepcopy(value)


def parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    """``['--distill.epochs', '3', '--data.hflip=false']`` -> ``[('distill.epochs', 3), ('data.hflip', False)]``
    (values read as YAML)."""
    pairs: list[tuple[str, Any]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"override '{arg}': expected --section.key VALUE")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override '{arg}' has no value; write {arg} VALUE")
            key, raw = arg[2:], args[i + 1]
            i += 2
        pairs.append((key.replace("-", "_"), _yaml(raw)))
    return pairs


def apply_override(config: dict, dotted: str, value: Any) -> None:
    """Set one dotted key. Naming a mapping merges ``value`` into it; inside an open mapping such as
    ``distill.losses`` a deeper key changes just that entry (``--distill.losses.kd.alpha 0.5``) and
    ``null`` removes it (``--distill.losses.filter_transfer_per_student null``); naming the open
    mapping itself (``--distill.losses '{kd: {}}'``) replaces it whole."""
    source, parts = "command-line override", dotted.split(".")
    node, free = config, False  # free: below an open mapping, any key goes
    for i, part in enumerate(parts):
        path, last = ".".join(parts[:i + 1]), i == len(parts) - 1
        if not free and part not in node:
            raise ConfigError(f"{source}: unknown config key '{path}'; known keys here: {', '.join(node) or '(none)'}")
        if last:
            if free and value is None:
                node.pop(part, None)
            elif not free and isinstance(node[part], dict) and path not in OPEN_KEYS:
                if not isinstance(value, dict):
                    raise ConfigError(f"{source}: '{path}' must be a mapping, got {value!r}")
                _merge(node[part], value, source, path + ".")
            else:
                node[part] = copy.deepcopy(value)
            return
        if free and not isinstance(node.get(part), dict):
            node[part] = {}
        elif not free and not isinstance(node[part], dict):
            raise ConfigError(f"{source}: '{path}' is not a mapping; '{dotted}' names nothing")
        node, free = node[part], free or path in OPEN_KEYS


def _merge_file(config: dict, path: Path, seen: tuple[Path, ...] = ()) -> None:
    """Merge a YAML profile into ``config``; ``base: other.yaml`` (relative to it) is merged first."""
    if not path.is_file():
        if seen:
            raise ConfigError(f"{seen[-1]}: its 'base' file {path} not found; fix the 'base:' line "
                              "(it is relative to the file that names it)")
        raise ConfigError(f"config file {path} not found; pick one from configs/ "
                          "(e.g. configs/fashion_mnist/quick.yaml)")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base' files include each other in a loop")
    try:
        loaded = _yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from e
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    base = loaded.pop("base", None)
    if base is not None:
        _merge_file(config, path.parent / base, (*seen, path.resolve()))
    _merge(config, loaded, str(path))


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> dict:
    """Defaults, then the YAML file (and its ``base`` chain), then the overrides: the resolved config."""
    config = copy.deepcopy(DEFAULTS)
    if path is not None:
        _merge_file(config, Path(path))
    pairs = parse_overrides(overrides or [])
    if config["distill"]["losses"] is None:  # the method's own, before the overrides that may adjust them
        method = next((value for key, value in reversed(pairs) if key == "method"), config["method"])
        chosen = METHODS.get(method) if isinstance(method, str) else None
        config["distill"]["losses"] = copy.deepcopy(chosen.default_losses if chosen else Method.default_losses)
    for dotted, value in pairs:
        apply_override(config, dotted, value)
    validate(config)
    return config


def _check_types(node: dict, defaults: dict, prefix: str = "") -> None:
    """Every value has the type of its default (ints pass for floats); None defaults take any value."""
    for key, default in defaults.items():
        dotted, value = f"{prefix}{key}", node[key]
        if dotted in OPEN_KEYS or default is None:
            continue
        if isinstance(default, dict):
            _check_types(value, default, dotted + ".")
            continue
        allowed = FREE_TYPES.get(dotted) or ((int, float) if type(default) is float else (type(default),))
        if isinstance(value, bool) != isinstance(default, bool) or not isinstance(value, allowed):
            kind = " or ".join(t.__name__ for t in allowed)
            raise ConfigError(f"{dotted} = {value!r}: expected {kind} (like the default {default!r})")
        if type(default) is float:
            node[key] = float(value)


def _positive(v: float) -> bool:
    return v > 0


def _at_least_one(v: int) -> bool:
    return v >= 1


def _non_negative(v: float) -> bool:
    return v >= 0


def _unit_interval(v: float) -> bool:
    return 0 <= v < 1


def _seed(v: int) -> bool:
    return 0 <= v < 2 ** 32  # what numpy's and torch's generators take


# dotted key -> (check, what the value must be)
RANGES = {
    **{k: (_at_least_one, "at least 1") for k in (
        "teacher.epochs", "distill.epochs", "data.batch_size", "data.eval_batch_size", "data.val_size",
        "partition.num_students", "partition.top_k", "trainer.num_nodes", "export.opset", "deploy.window")},
    **{k: (_positive, "above 0") for k in ("teacher.lr", "distill.lr", "partition.resolution",
                                           "deploy.deadline_ms")},
    **{k: (_non_negative, "0 or more") for k in ("teacher.weight_decay", "distill.weight_decay",
                                                 "deploy.drill_images", "deploy.drill_device",
                                                 "distill.teacher_pool.views", "distill.teacher_pool.seed")},
    **{k: (_unit_interval, "in [0, 1)") for k in ("teacher.momentum", "distill.momentum",
                                                   "distill.student_dropout")},
    "partition.percentile": (lambda v: 0 <= v < 100, "in [0, 100)"),
    **{k: (_seed, "in [0, 2**32)") for k in ("seed", "data.split_seed")},
    **{f"data.synthetic.{k}": (_at_least_one, "at least 1") for k in ("train_size", "test_size", "channels")},
    "data.synthetic.image_size": (lambda v: v >= 8, "at least 8 (pixels)"),
    "data.synthetic.num_classes": (lambda v: v >= 2, "at least 2"),
}


def _check_ranges(config: dict) -> None:
    for dotted, (ok, what) in RANGES.items():
        value = select(config, dotted)
        if not ok(value):
            raise ConfigError(f"{dotted} = {value!r}: must be {what}")
    _check_synthetic(config["data"])


def _check_synthetic(data: dict) -> None:
    """Generated images must fit in memory, and they read no files."""
    if data["dataset"] != "synthetic":
        return
    if data["data_dir"] is not None:
        raise ConfigError(f"data.data_dir = {data['data_dir']!r}: the synthetic data set is generated and reads no "
                          "files; remove data.data_dir or choose another data.dataset")
    need, have = synthetic_peak_bytes(**data["synthetic"]), memory_bytes()
    if need > have // 2:
        raise ConfigError(f"data.synthetic: {data['synthetic']['train_size']} training and "
                          f"{data['synthetic']['test_size']} test images of {data['synthetic']['channels']}x"
                          f"{data['synthetic']['image_size']}px need about {need / 2**30:.1f} GiB to generate, more "
                          f"than half of this machine's {have / 2**30:.1f} GiB; make them smaller")


def _check_components(config: dict) -> None:
    """Names and options that the registries must know, checked before any stage runs."""
    for dotted, names in (("teacher.arch", [config["teacher"]["arch"]]),
                          ("distill.students", config["distill"]["students"])):
        for name in names:
            if name not in ARCHITECTURES:
                raise ConfigError(f"{dotted}: unknown architecture {name!r}; choose from {', '.join(ARCHITECTURES)}")
    try:
        build_losses(config["distill"]["losses"] or {})
        EnergyModel.from_config(config["evaluate"]["energy"])
        if config["export"]["sign_key"] is not None:
            load_private_key(config["export"]["sign_key"])
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from e
    _check_method(config)


def _check_method(config: dict) -> None:
    """``method`` names a registered method; ``method_options`` gets the chosen method's defaults filled in,
    and every method it names must know the options given."""
    name = config["method"]
    if name not in METHODS:
        raise ConfigError(f"method = {name!r}; choose one of {', '.join(METHODS)}")
    options = config["method_options"]
    if not isinstance(options, dict):
        raise ConfigError(f"method_options must be a mapping of method name to options, got {options!r}")
    unknown = sorted(set(options) - set(METHODS))
    if unknown:
        raise ConfigError(f"method_options.{unknown[0]}: no such method; choose from {', '.join(METHODS)}")
    try:
        for method in {*options, name}:
            options[method] = METHODS[method].resolve_options(options.get(method))
        METHODS[name].check_config(config)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def validate(config: dict) -> None:
    if isinstance(config["distill"]["students"], str):
        config["distill"]["students"] = [config["distill"]["students"]]
    _check_types(config, DEFAULTS)
    _check_ranges(config)
    _check_components(config)
    _check_choices(config)


def _check_choices(config: dict) -> None:
    """Choice keys take the names their registries define (not copies of them)."""
    choices = {"data.dataset": DATASETS, "teacher.schedule": SCHEDULES, "distill.schedule": SCHEDULES,
               "partition.pooling": POOLINGS, "partition.edge_rule": EDGE_RULES, "partition.mode": PARTITION_MODES,
               "export.transport": TRANSPORTS, "wandb.mode": WANDB_MODES}
    for dotted, allowed in choices.items():
        section, key = dotted.split(".")
        if config[section][key] not in allowed:
            raise ConfigError(f"{dotted} = {config[section][key]!r}; choose one of {', '.join(allowed)}")


def select(config: dict, dotted: str) -> Any:
    """The value at a dotted key: ``select(config, "distill.teacher_pool.views")``."""
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def run_dir_of(config: dict) -> Path:
    return Path(config["run_dir"] or Path("runs") / config["name"])


def dump_config(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False)
