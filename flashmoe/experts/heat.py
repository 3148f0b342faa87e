"""Resident decode's placement heat, kept beside the model between runs.

Adaptive placement (policy.AdaptivePlacement) learns which experts each layer uses most, and moves
them to GPU slots; from a cold start that takes about a thousand tokens (docs/EXPERIMENTS.md entry
58). The engine saves the heat it learned in the model directory when it closes, and the next
preload puts each layer's hottest experts on the GPU from the start and continues learning from
that heat. The file is the engine's own: a float32 [layers, experts] tensor, written atomically;
one that does not fit the model is ignored with a note, never trusted.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

HEAT_FILE = "placement_heat.safetensors"


def read_heat(model_dir: Path, shape: tuple[int, int]) -> tuple[np.ndarray | None, str]:
    """(The saved heat, or None; a note for the engine's start line, empty when there is no file)."""
    path = Path(model_dir) / HEAT_FILE
    if not path.exists():
        return None, ""
    try:
        heat = load_file(path)["heat"]
    except (OSError, KeyError, SafetensorError) as e:
        return None, f"placement heat ignored: {path} is unreadable ({e}); delete it to stop this note"
    if heat.shape != shape or not np.isfinite(heat).all() or (heat < 0).any():
        return None, (f"placement heat ignored: {path} holds {list(heat.shape)} values, this model needs {list(shape)} "
                      "finite non-negative ones; delete it to stop this note")
    return heat.astype(np.float64), f"placement from the heat the last run saved ({HEAT_FILE})"


def write_heat(model_dir: Path, heat: np.ndarray) -> Path:
    """Save the heat beside the model, atomically (a reader sees the old file or the new one)."""
    path = Path(model_dir) / HEAT_FILE
    tmp = path.with_name(f".{HEAT_FILE}.{os.getpid()}.tmp")
    try:
        save_file({"heat": np.ascontiguousarray(heat, dtype=np.float32)}, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def hottest_first(heat: np.ndarray | None, layer: int, num_experts: int) -> list[int]:
    """A layer's experts, the hottest first (ties and no heat: by id)."""
    if heat is None:
        return list(range(num_experts))
    return np.argsort(-heat[layer], kind="stable").tolist()
