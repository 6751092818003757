"""Model presets: HF-format config.json files with real model shapes, found by name.

They live in the package (`jaxserve/configs/*.json`, shipped as package data) so that a
non-editable install finds them too; the repository's top-level `configs/` only points here.
Presets carry shapes, not weights: they are for `dummy` loading (benchmarks, compile checks).
"""
from __future__ import annotations

import json
from importlib import resources

from jaxserve.config import ConfigError, ModelConfig


def _dir():
    return resources.files("jaxserve") / "configs"


def list_presets() -> list[str]:
    return sorted(p.name[:-len(".json")] for p in _dir().iterdir() if p.name.endswith(".json"))


def is_preset(name: str) -> bool:
    return (_dir() / f"{name}.json").is_file()


def preset_dict(name: str) -> dict:
    """The preset's HF config.json contents."""
    f = _dir() / f"{name}.json"
    if not f.is_file():
        raise ConfigError(f"unknown model preset {name!r} (available: {', '.join(list_presets())})")
    return json.loads(f.read_text())


def load_preset(name: str) -> ModelConfig:
    return ModelConfig.from_hf_dict(preset_dict(name), source=f"preset {name}")
