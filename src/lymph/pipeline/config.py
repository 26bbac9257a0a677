"""Pipeline configuration: built-in defaults < pipeline file (TOML) < ``--set`` overrides.

A configuration is a two-level mapping ``section.key = value``. Every key has a default
here, which also fixes its type; a pipeline file or ``--set`` naming an unknown section or
key, or giving a value of the wrong type, is a :class:`LymphError` naming the key.
"""

from __future__ import annotations

import copy
import json
import tomllib
from pathlib import Path
from typing import Any

from lymph.errors import LymphError

#: The built-in defaults. Pipeline files override some of them; the comments say what each is.
DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {
        "path": "",  # challenge root or split folder (``--data`` overrides)
        "synth": False,  # generate synthetic data instead of reading ``path``
        "synth_patients": 40,
        "synth_test_patients": 6,
        "synth_images": "8:24",
        "synth_size": 224,
        "synth_seed": 0,
    },
    "ingest": {
        "size": 112,  # the report downsamples 224 to 112
        "crop": 0,  # centre crop in source pixels before resizing; 0 = whole image
    },
    "embed": {  # 0 = the method's own default (ae: dim 60, 20 epochs, batch 128, lr 1e-3)
        "method": "ae",
        "dim": 0,
        "epochs": 0,
        "batch_size": 0,
        "lr": 0.0,
        "seed": 0,
        "device": "auto",
        "folds": 5,  # weak supervision only: K fold-safe scorers
        "lr_schedule": "",  # "" = the method's (constant); or "cosine"
        "channels": [],  # weak only: the cell scorer's conv widths; [] = the method's (16,32,64,64)
    },
    "head": {
        "pooling": "attention",
        "fusion": "concat",  # concat (MLP on pooled + clinical) or late
        "clinical": True,
        "images": True,
        "attention_hidden": 128,
        "mlp": [256, 128],
        "dropout": 0.25,
        "lr": 2e-3,
        "weight_decay": 1e-4,
        "batch_size": 32,  # patients per step
        "max_epochs": 100,
        "patience": 15,
        "threshold": "inner",
        "validation": "cv",  # cv (stratified k-fold, repeated) or holdout (one 80/20 split)
        "folds": 5,
        "repeats": 1,
        "seed": 0,
    },
    "compare": {
        "enabled": True,
        "folds": 5,
        "repeats": 1,
        "seed": 0,
        "target_sensitivity": 0.95,  # the report's triage operating point (sensitivity for malignancy)
    },
}


#: allowed values of the numeric and named settings: (kind, bounds...) as lymph.checks
RANGES: dict[str, tuple[Any, ...]] = {
    "data.synth_patients": ("int", 2), "data.synth_test_patients": ("int", 0),
    "data.synth_size": ("int", 8, 4096), "data.synth_seed": ("int", 0, 2**31 - 1),
    "ingest.size": ("int", 8, 1024), "ingest.crop": ("int", 0),  # 0 = whole image
    "embed.dim": ("int", 0), "embed.epochs": ("int", 0), "embed.batch_size": ("int", 0),
    "embed.lr": ("float", 0.0), "embed.seed": ("int", 0, 2**31 - 1), "embed.folds": ("int", 2),
    "embed.device": ("choice", ("auto", "cpu", "cuda")),
    "embed.lr_schedule": ("choice", ("", "constant", "cosine")),
    "embed.channels": ("channels",),  # [] = the method's own widths
    "embed.method": ("method",),  # lymph.encoder.registry (torch-free)
    "head.attention_hidden": ("int", 1), "head.mlp": ("ints", 1),
    "head.dropout": ("frac",), "head.lr": ("pos",), "head.weight_decay": ("float", 0.0),
    "head.batch_size": ("int", 1), "head.max_epochs": ("int", 1), "head.patience": ("int", 1),
    "head.threshold": ("threshold",), "head.validation": ("choice", ("cv", "holdout")),
    "head.fusion": ("fusion",),  # lymph.head.registry (torch-free)
    "head.pooling": ("pooling",),
    "head.folds": ("int", 2), "head.repeats": ("int", 1), "head.seed": ("int", 0, 2**31 - 1),
    "compare.folds": ("int", 2), "compare.repeats": ("int", 1), "compare.seed": ("int", 0, 2**31 - 1),
}


def check_setting(name: str, value: Any) -> None:
    """Range-check one resolved setting (``section.key``) with lymph.checks' message."""
    from lymph.checks import check_choice, check_float, check_int, check_threshold

    spec = RANGES.get(name)
    if spec is None:
        return
    kind, *b = spec
    if kind == "int":
        check_int(name, value, *b)
    elif kind == "ints":
        for v in value:
            check_int(name, v, *b)
    elif kind == "float":
        check_float(name, value, *b)
    elif kind == "pos":
        check_float(name, value, 0.0, lo_open=True)
    elif kind == "frac":
        check_float(name, value, 0.0, 1.0, hi_open=True)
    elif kind == "threshold":
        check_threshold(name, value)
    elif kind == "choice":
        check_choice(name, value, b[0])
    elif kind == "channels":
        if value:  # [] = the method's default
            from lymph.checks import check_channels

            check_channels(name, value)
    elif kind == "method":
        from lymph.encoder.registry import check_method

        check_method(value, name)
    elif kind == "pooling":
        from lymph.head.registry import check_pooling

        check_pooling(value, name)
    elif kind == "fusion":
        from lymph.head.registry import fusion_estimator

        fusion_estimator(value, name)


def _type_name(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list"}.get(type(v), type(v).__name__)


def _coerce(key: str, default: Any, value: Any) -> Any:
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    elif isinstance(default, list):
        elem = type(default[0]) if default else int  # the empty defaults are integer lists
        if isinstance(value, list) and all(isinstance(x, elem) and not isinstance(x, bool)
                                           for x in value):
            return value
    raise LymphError(f"{key}: expected {_type_name(default)}, got {value!r}")


def merge(config: dict[str, dict[str, Any]], overrides: dict[str, Any], source: str) -> None:
    """Merge ``overrides`` (``{section: {key: value}}``) into ``config`` in place, checked."""
    for section, values in overrides.items():
        if section not in DEFAULTS:
            raise LymphError(
                f"{source}: unknown section [{section}] (expected one of {', '.join(DEFAULTS)})"
            )
        if not isinstance(values, dict):
            raise LymphError(f"{source}: [{section}] must be a table of settings")
        for key, value in values.items():
            if key not in DEFAULTS[section]:
                raise LymphError(
                    f"{source}: unknown key {section}.{key} "
                    f"(known: {', '.join(sorted(DEFAULTS[section]))})"
                )
            if (section, key) == ("head", "threshold") and isinstance(value, (int, float)) \
                    and not isinstance(value, bool):
                value = str(value)  # a number is as good as its text ('inner' or (0, 1))
            try:
                config[section][key] = _coerce(f"{section}.{key}", DEFAULTS[section][key], value)
                check_setting(f"{section}.{key}", config[section][key])
            except LymphError as e:
                raise LymphError(f"{source}: {e}") from None


def parse_set(item: str) -> dict[str, Any]:
    """``section.key=value`` (value in TOML syntax; bare words are strings)."""
    name, eq, raw = item.partition("=")
    section, dot, key = name.strip().partition(".")
    if not eq or not dot or not section or not key:
        raise LymphError(f"--set: expected section.key=value, got {item!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return {section: {key: value}}


def resolve(pipeline: str | Path | dict[str, Any] | None = None, sets: list[str] | None = None,
            data: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Defaults < pipeline file < ``--set`` (< ``--data``). Returns the resolved config."""
    config = copy.deepcopy(DEFAULTS)
    if isinstance(pipeline, dict):
        merge(config, pipeline, "built-in settings")
    elif pipeline is not None:
        path = Path(pipeline)
        if not path.is_file():
            raise LymphError(f"{path}: pipeline file not found")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise LymphError(f"{path}: not a UTF-8 text file (byte {e.start}); expected a "
                             "TOML pipeline file") from None
        try:
            overrides = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise LymphError(f"{path}: not valid TOML ({e})") from None
        merge(config, overrides, str(path))
    for item in sets or []:
        merge(config, parse_set(item), "--set")
    if data is not None:
        config["data"]["path"] = str(data)
        config["data"]["synth"] = False
    e = config["embed"]
    if e["channels"] and e["method"] != "weak":
        raise LymphError(f"embed.channels: only for embed.method = \"weak\" (the cell scorer's "
                         f"widths), not {e['method']!r}; remove it or set []")
    return config


def dumps(config: dict[str, Any]) -> str:
    return json.dumps(config, indent=2, sort_keys=True)


#: The settings of `lymph demo`, the same as ``pipelines/demo.toml`` (a test checks it), kept
#: here so that the demo needs no file from the source tree.
DEMO: dict[str, dict[str, Any]] = {
    "data": {"synth": True, "synth_patients": 30, "synth_test_patients": 4,
             "synth_images": "6:12", "synth_size": 64, "synth_seed": 0},
    "ingest": {"size": 32},
    "embed": {"method": "ae", "dim": 16, "epochs": 4, "batch_size": 64},
    "head": {"folds": 3, "max_epochs": 40},
    "compare": {"folds": 3},
}
