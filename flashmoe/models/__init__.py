"""Model families, found by config.json's `model_type`. A family is one module: `Args` (its
config keys and layer plan, models/args.py), `NAMES` (its checkpoint names, models/names.py) and,
where its checkpoints store a tensor differently from the modules, `sanitize`. Adding a family of
known layer kinds is that module, its tests and its bench preset."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from . import glm4_moe, gpt_oss, minimax_m2, qwen3_5_moe, qwen3_moe, qwen3_next, qwen4_exp
from ..utils import read_json
from .args import CONFIG_FIX, ConfigError, ModelArgs
from .names import CheckpointNames

FAMILIES: dict[str, ModuleType] = {t: m for m in (qwen3_5_moe, qwen3_next, qwen3_moe, minimax_m2, glm4_moe, gpt_oss, qwen4_exp)
                                   for t in m.Args.MODEL_TYPES}


class UnsupportedModelError(ConfigError):
    pass


def family(model_type: str | None) -> ModuleType:
    """The module of the family that reads configs of this model_type."""
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; flashmoe runs {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]


def names(args: ModelArgs) -> CheckpointNames:
    return family(args.model_type).NAMES


def sanitize(args: ModelArgs, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """A dense checkpoint tensor (canonical name) -> the tensors the modules hold (the same, unless
    the family stores it differently)."""
    fam = family(args.model_type)
    return fam.sanitize(args, name, tensor) if hasattr(fam, "sanitize") else [(name, tensor)]


def args_from_dict(config: Any, generation_config: Any = None) -> ModelArgs:
    if not isinstance(config, dict):
        raise ConfigError(f"config.json must hold a JSON object, not {type(config).__name__}{CONFIG_FIX}")
    return family(config.get("model_type")).Args.from_config(config, generation_config)


def read_args(model_dir: str | Path) -> ModelArgs:
    """The model's arguments from its directory's config.json (and generation_config.json)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: point at a Hugging Face model directory with a config.json")
    gen_path = path.with_name("generation_config.json")
    generation = read_json(gen_path, ConfigError, "; fetch it again from the model's repository") if gen_path.is_file() else None
    return args_from_dict(read_json(path, ConfigError, CONFIG_FIX), generation)
