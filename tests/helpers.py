"""Helpers shared by test modules (imported as `helpers`: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import contextlib
import hashlib

import torch

from cnnlab.models import chain, fused


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's keys and values, independent of memory layout."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def counted(name: str):
    """Count the calls of cnnlab.models.fused.<name> inside the block: yields the list they
    append to."""
    original, calls = getattr(fused, name), []

    def counting(*args):
        calls.append(1)
        return original(*args)

    setattr(fused, name, counting)
    try:
        yield calls
    finally:
        setattr(fused, name, original)


@contextlib.contextmanager
def finding_none(owner: object, name: str):
    """owner.name (a planning function) finds nothing inside the block: it returns None."""
    original = getattr(owner, name)
    setattr(owner, name, lambda *args: None)
    try:
        yield
    finally:
        setattr(owner, name, original)


def per_block():
    """Each fused block as its own autograd Function inside the block, as without
    cnnlab.models.chain: for tests of the blocks themselves."""
    return finding_none(chain, "chain_prefix")


def through_autograd():
    """Training steps through autograd (the chain as an autograd Function), as before
    cnnlab.training.gradients stepped whole-model chains without a graph: for tests that hold
    the chain to the blocks one by one, bit for bit."""
    from cnnlab.training import gradients

    return finding_none(gradients, "whole_model_chain")
