"""Loading a weights file into a model: safetensors or a torch state_dict, strictly checked, never executed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lookalike.embed.models.registry import ModelError

if TYPE_CHECKING:
    import torch


def read_state_dict(path: str) -> Mapping[str, Any]:
    import torch

    if path.endswith(".safetensors"):  # the format Hugging Face models ship in: plain tensors, no pickle
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as err:  # safetensors raises its own error types for truncated or foreign files
            raise ModelError(f"cannot read weights file {path}: {type(err).__name__}: {err}".splitlines()[0]) from err
    try:
        # weights_only: a weights file is data and must not be able to run code; map_location: a file saved on
        # a GPU machine still loads on a CPU executor.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several unrelated types for corrupt or non-torch files
        raise ModelError(f"cannot read weights file {path}: {type(err).__name__}: {err}".splitlines()[0]) from err
    if not isinstance(state, Mapping):
        raise ModelError(
            f"weights file {path} holds a {type(state).__name__}, expected a state_dict "
            "(torch.save(model.state_dict(), path))"
        )
    return state


def load_weights(model: torch.nn.Module, state: Mapping[str, Any], name: str, path: str) -> None:
    """Load a full classification state_dict; any missing, extra or misshapen tensor is a ModelError."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches raise even when strict=False
        raise ModelError(f"weights file {path} does not fit {name}: {' '.join(str(err).split())[:400]}") from err
    if result.missing_keys or result.unexpected_keys:
        raise ModelError(
            f"weights file {path} does not fit {name}: {len(result.missing_keys)} missing keys "
            f"{result.missing_keys[:3]}, {len(result.unexpected_keys)} unexpected keys "
            f"{result.unexpected_keys[:3]}"
        )
