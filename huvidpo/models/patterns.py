"""Parameter-name patterns of :class:`~huvidpo.models.VideoUNet`, without importing torch (the training
configs default to them and the control plane validates those configs)."""

from __future__ import annotations

DEFAULT_STAGE1_PATTERNS = (".conv1d.", ".conv_gate.", ".attn_temp.", "attn1.to_q.")
"""Stage-1 trainable parameters: temporal conv, gate, temporal attention and the SparseCausal query."""

__all__ = ["DEFAULT_STAGE1_PATTERNS"]
