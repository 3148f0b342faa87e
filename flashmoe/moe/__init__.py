"""The MoE block shared by every family (block) and its routing rules (routing)."""
