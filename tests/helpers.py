"""Helpers shared by test modules (imported as `helpers`: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import hashlib

import torch


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's keys and values, independent of memory layout."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
