"""Model families by config `model_type` family name. Each module exposes `Model`, `canonical_name`,
`parse_expert_name` and `sanitize` (checkpoint tensor -> module tensors)."""

from types import ModuleType

from . import qwen3_5_moe, qwen3_next

FAMILIES: dict[str, ModuleType] = {"qwen3_5_moe": qwen3_5_moe, "qwen3_next": qwen3_next}


def family(model_type: str) -> ModuleType:
    return FAMILIES[model_type]
