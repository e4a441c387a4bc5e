"""Checkpoint and weights I/O: safetensors + model.json for weights, weights_only torch files for state."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from cnnlab import fileio
from cnnlab.errors import CheckpointError
from cnnlab.inference import Preprocessing
from cnnlab.models import CnnModel, build_model

WEIGHTS_FILE = "best.safetensors"
MODEL_FILE = "model.json"
LAST_CHECKPOINT = "last.ckpt"
BUNDLE_FORMAT = 1
DIGEST_KEY = "sha256"  # safetensors metadata / checkpoint entry holding the content digest


@dataclass(frozen=True)
class ModelInfo:
    """What model.json says: enough to rebuild the model and feed it images like training did."""

    layers: list[Any]
    classes: tuple[str, ...]
    preprocessing: Preprocessing
    model_name: str = ""
    epoch: int = 0
    monitor: str = ""
    monitor_value: float | None = None
    final_activation: str | None = "softmax"  # what the logits are turned into by callers

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": BUNDLE_FORMAT,
            "model_name": self.model_name,
            "layers": self.layers,
            "classes": list(self.classes),
            "num_classes": len(self.classes),
            "preprocessing": self.preprocessing.to_dict(),
            "final_activation": self.final_activation,
            "epoch": self.epoch,
            "monitor": self.monitor,
            "monitor_value": self.monitor_value,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelInfo:
        return cls(
            layers=raw["layers"],
            classes=tuple(raw["classes"]),
            preprocessing=Preprocessing.from_dict(raw["preprocessing"]),
            model_name=raw.get("model_name", ""),
            epoch=int(raw.get("epoch", 0)),
            monitor=raw.get("monitor", ""),
            monitor_value=raw.get("monitor_value"),
            final_activation=raw.get("final_activation", "softmax"),
        )


def save_weights(
    folder: Path, model: torch.nn.Module, info: ModelInfo, weights_name: str = WEIGHTS_FILE
) -> None:
    """Write `weights_name` (safetensors) then model.json, each atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {DIGEST_KEY: content_digest(tensors)}
    fileio.write_bytes(folder / weights_name, save_safetensors_bytes(tensors, metadata=metadata))
    fileio.write_text(folder / MODEL_FILE, json.dumps(info.to_dict(), indent=2) + "\n")


def read_model_info(folder: Path) -> ModelInfo:
    path = folder / MODEL_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing, so the model cannot be rebuilt. Point to a run folder written "
            "by `cnnlab train` (it holds model.json and best.safetensors)."
        )
    try:
        return ModelInfo.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} is corrupt ({exc}). Re-run training to rewrite it.") from exc


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file with errors that name it (missing, empty, truncated, corrupt)."""
    if not path.is_file():
        raise CheckpointError(f"Weights file {path} does not exist. Train first or check the path.")
    data = path.read_bytes()
    if not data:
        raise CheckpointError(
            f"Weights file {path} is empty (0 bytes); it was never fully written."
        )
    try:
        tensors = load_safetensors_bytes(data)
        expected = _safetensors_metadata(data).get(DIGEST_KEY)
    except (SafetensorError, ValueError, RuntimeError, struct.error, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"Weights file {path} is corrupt or truncated ({exc}). Restore it or re-run training."
        ) from exc
    if expected is not None and expected != content_digest(tensors):
        raise CheckpointError(
            f"Weights file {path} is corrupt: its content does not match the checksum written "
            "with it (a damaged disk or copy?). Restore it or re-run training."
        )
    return tensors


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` map of a safetensors file (8-byte little-endian header size, JSON)."""
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size].decode("utf-8"))
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def content_digest(tree: Any) -> str:
    """SHA-256 over a nest of dicts, lists, tensors and scalars: keys, dtypes, shapes and bytes.

    Neither torch's zip files nor safetensors check their data, so a flipped bit would load
    as silently wrong numbers; this digest, stored with the file, turns it into an error.
    """
    digest = hashlib.sha256()
    _update_digest(digest, tree)
    return digest.hexdigest()


def _update_digest(digest: Any, node: Any) -> None:
    if isinstance(node, torch.Tensor):
        tensor = node.detach().cpu()
        if tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last):
            tensor = tensor.permute(0, 2, 3, 1)  # memory order already: hashed without a copy
        flat = tensor.contiguous().reshape(-1)
        digest.update(f"T{flat.dtype}{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy())
    elif isinstance(node, dict):
        digest.update(f"D{len(node)}".encode())
        for key, value in sorted(node.items(), key=lambda item: repr(item[0])):
            digest.update(f"K{key!r}".encode())
            _update_digest(digest, value)
    elif isinstance(node, list | tuple):
        digest.update(f"L{len(node)}".encode())
        for value in node:
            _update_digest(digest, value)
    else:
        digest.update(f"S{type(node).__name__}:{node!r}".encode())


def load_model(folder: Path, weights_name: str = WEIGHTS_FILE) -> tuple[CnnModel, ModelInfo]:
    """Rebuild the model of a run folder from model.json and load its best weights."""
    info = read_model_info(folder)
    model = build_model(info.layers, info.preprocessing.input_shape, len(info.classes))
    state = load_weights(folder / weights_name)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{folder / weights_name} does not match the model in {folder / MODEL_FILE}: {exc}"
        ) from exc
    model.eval()
    return model, info


def save_checkpoint(path: Path, checkpoint: dict[str, Any]) -> None:
    """torch.save the full training state atomically: the previous file survives any crash.

    The state's content digest goes in with it, so a damaged file is refused instead of
    resuming from silently wrong numbers.
    """
    body = {k: v for k, v in checkpoint.items() if k != DIGEST_KEY}
    body[DIGEST_KEY] = content_digest(body)
    fileio.write_with(path, lambda handle: torch.save(body, handle))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load training state with weights_only=True; never falls back to full unpickling."""
    if not path.is_file():
        raise CheckpointError(
            f"Checkpoint {path} does not exist. A run writes last.ckpt after its first epoch "
            "(or every --checkpoint-every-steps steps)."
        )
    data = path.read_bytes()
    if not data:
        raise CheckpointError(f"Checkpoint {path} is empty (0 bytes); it was never fully written.")
    try:
        with warnings.catch_warnings():
            # Damaged bytes can read as an unknown pickle protocol; torch then warns and asks
            # for a bug report to PyTorch. The CheckpointError below says what is wrong.
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"Refusing to load checkpoint {path}: it is damaged or holds Python objects other "
            "than tensors and plain data, which could run code; cnnlab never unpickles such "
            "files. Use a last.ckpt written by cnnlab, or start the run again."
        ) from exc
    except Exception as exc:  # any failure to decode untrusted bytes (weights_only ran no code)
        raise CheckpointError(
            f"Checkpoint {path} is corrupt or truncated ({type(exc).__name__}: {exc}). "
            "Resume from an earlier copy or start the run again."
        ) from exc
    if not isinstance(checkpoint, dict) or "loop" not in checkpoint:
        raise CheckpointError(
            f"{path} is not a cnnlab training checkpoint. Give a run folder written by "
            "`cnnlab train`."
        )
    expected = checkpoint.pop(DIGEST_KEY, None)
    if expected != content_digest(checkpoint):
        raise CheckpointError(
            f"Checkpoint {path} is corrupt: its content does not match the checksum written "
            "with it (a damaged disk or copy?). Resume from an earlier copy or start the run "
            "again."
        )
    return checkpoint
