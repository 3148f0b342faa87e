"""Checkpoint tensor names -> this package's module names, as data each family fills in.

A family's checkpoints may prefix the text model (a VLM's `model.language_model.`), hold tensors
the text model never uses (vision tower, multi-token-prediction head and layers), put the MoE
block under another name (`block_sparse_moe`), and name expert projections their own way (`w1`,
`w3`, `w2`). `canonical` maps a name to the module name it loads into (None: skipped), and
`expert` says which expert tensor a canonical name is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")  # a routed expert's, in the record's order (gate, up: gate_up)


@dataclass(frozen=True)
class CheckpointNames:
    skip: tuple[str, ...] = ()  # regexes matched at the start of a name: tensors never loaded
    prefixes: tuple[str, ...] = ()  # stripped, leaving the name under "model."
    renames: tuple[tuple[str, str], ...] = ()  # (checkpoint part, ours), applied in order
    expert_projections: dict[str, str] = field(default_factory=lambda: {p: p for p in PROJECTIONS})
    fused_in_out: bool = False  # fused [E, ...] expert tensors stored [E, in, out] (gpt-oss), not [E, out, in]
    gate_up_interleaved: bool = False  # gate and up outputs alternate (gpt-oss), not gate rows then up rows

    def canonical(self, name: str, num_layers: int) -> str | None:
        """The module name `name` loads into, or None for a tensor the text model never uses
        (including layers past num_layers: the MTP layers some checkpoints append)."""
        if any(re.match(pattern, name) for pattern in self.skip):
            return None
        for prefix in self.prefixes:
            if name.startswith(prefix):
                name = "model." + name[len(prefix) :]
                break
        for old, new in self.renames:
            name = name.replace(old, new)
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        if layer and int(layer[1]) >= num_layers:
            return None
        return name

    def expert(self, name: str) -> tuple[int, int | None, str] | None:
        """(layer, expert or None for fused [E, ...] tensors, projection) of a canonical name of an
        expert tensor, the projection as ours (gate_proj, up_proj, down_proj, or gate_up_proj fused;
        their biases as gate_up_proj.bias, down_proj.bias; MXFP4's codes and scales as .blocks, .scales;
        mlx-lm's stacked switch_mlp projections as gate_proj.weight, .scales, .biases and so on)."""
        m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)(?:_(bias|blocks|scales))?", name)
        if m:
            return int(m[1]), None, m[2] + (f".{m[3]}" if m[3] else "")
        m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.switch_mlp\.(gate_proj|up_proj|down_proj)\.(weight|scales|biases)", name)
        if m:  # mlx-lm's experts, stacked per projection
            return int(m[1]), None, f"{m[2]}.{m[3]}"
        m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)\.weight", name)
        if m and m[3] in self.expert_projections:
            return int(m[1]), int(m[2]), self.expert_projections[m[3]]
        return None
