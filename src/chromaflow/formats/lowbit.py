"""Low-bit weights inside safetensors: ComfyUI's scaled fp8, chromaflow's int8 and bitsandbytes NF4.

Conventions read and written (spec inference-techniques.md §7.2-7.3):
- fp8 (ComfyUI "scaled"): `X.weight` float8_e4m3fn, `X.scale_weight` float32 scalar, marker tensor `scaled_fp8`;
  `X.scale_input` (for fp8 matmuls) is ignored. Plain fp8 weights without a scale use scale 1.
- int8 (weight-only): `X.weight` int8 and `X.weight_scale` float32 per output row; metadata
  `chromaflow.quantization = int8`.
- NF4 (bitsandbytes serialization, as diffusers and Forge write it): `X.weight` packed uint8 plus
  `X.weight.absmax`, `.quant_map`, `.nested_absmax`, `.nested_quant_map`, `.quant_state.bitsandbytes__nf4`.
`wrap` hides the companion tensors and presents each weight as a logical tensor (`get` expands it, `packed` keeps
it compact for models.quant); files without any of these come back unchanged.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from .checkpoint import Checkpoint, CheckpointError, Packed, save_checkpoint

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_FP8_SCALES = (".scale_weight", ".weight_scale")
_NF4_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_NF4_STATE = ".quant_state.bitsandbytes__"


def _nf4_state_key(ckpt: Checkpoint, weight: str) -> str | None:
    return next((k for k in (f"{weight}{_NF4_STATE}nf4", f"{weight}{_NF4_STATE}fp4") if k in ckpt), None)


def wrap(ckpt):
    """`ckpt` itself, or a LowBitCheckpoint when it holds fp8 / int8 / NF4 weights."""
    if not isinstance(ckpt, Checkpoint):
        return ckpt  # GGUF: already logical
    keys = ckpt.keys()
    if any(_NF4_STATE in k or k.endswith(_FP8_SCALES) or k.endswith("scaled_fp8") for k in keys) or \
            any(ckpt.dtype_name(k).startswith("float8") for k in keys):
        return LowBitCheckpoint(ckpt)
    return ckpt


class LowBitCheckpoint:
    """A Checkpoint whose low-bit weights read as logical tensors; the companion tensors are not listed."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.files, self.config, self.metadata = ckpt.files, ckpt.config, ckpt.metadata
        self.kinds: dict[str, str] = {}  # weight key -> "fp8" | "int8" | "nf4"
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._nf4_states: dict[str, dict] = {}
        hidden = set()
        for key in ckpt.keys():
            if key.endswith("scaled_fp8") or key.endswith(".scale_input") or key.endswith(".input_scale"):
                hidden.add(key)
            elif (state_key := _nf4_state_key(ckpt, key)) is not None:
                state = self._read_nf4_state(key, state_key)
                parts = [f"{key}.{p}" for p in _NF4_PARTS if f"{key}.{p}" in ckpt]
                hidden.update([state_key, *parts])
                self.kinds[key], self._shapes[key], self._nf4_states[key] = "nf4", tuple(state["shape"]), state
            elif ckpt.dtype_name(key).startswith("float8"):
                self.kinds[key] = "fp8"
            elif ckpt.dtype_name(key) == "int8" and f"{key}_scale" in ckpt:
                self.kinds[key] = "int8"
        for key, kind in self.kinds.items():
            if kind in ("fp8", "int8"):
                scale = self._scale_key(key)
                if scale is not None:
                    hidden.add(scale)
                    if ckpt.numel(scale) not in (1, ckpt.shape(key)[0]):
                        raise CheckpointError(f"{ckpt.name}: scale {scale!r} has shape {ckpt.shape(scale)}, "
                                              f"expected a scalar or one per row of {key!r} {ckpt.shape(key)}; "
                                              "the file is corrupt")
        self._keys = [k for k in ckpt.keys() if k not in hidden]

    def _read_nf4_state(self, key: str, state_key: str) -> dict:
        raw = self.ckpt.get(state_key)
        try:
            state = json.loads(bytes(raw.to(torch.uint8).tolist()).decode())
            shape = tuple(int(s) for s in state["shape"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.ckpt.name}: {state_key!r} is not a bitsandbytes quant state ({e}); "
                                  "the file is corrupt: re-export it") from None
        missing = [p for p in ("absmax", "quant_map") if f"{key}.{p}" not in self.ckpt]
        if missing:
            raise CheckpointError(f"{self.ckpt.name}: NF4 weight {key!r} lacks {', '.join(missing)}; "
                                  "the file is incomplete: re-export it")
        return {**state, "shape": shape}

    def _scale_key(self, key: str) -> str | None:
        stem = key.removesuffix(".weight")
        return next((k for k in (stem + ".scale_weight", key + "_scale") if k in self.ckpt), None)

    # --- the Checkpoint interface -------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.ckpt.name

    def keys(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def file(self, key: str) -> Path:
        return self.ckpt.file(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes.get(key) or self.ckpt.shape(key)

    def numel(self, key: str) -> int:
        return math.prod(self.shape(key))

    def dtype(self, key: str) -> torch.dtype:
        return torch.uint8 if self.kinds.get(key) == "nf4" else self.ckpt.dtype(key)

    def dtype_name(self, key: str) -> str:
        kind = self.kinds.get(key)
        if kind == "nf4":
            return self._nf4_states[key].get("quant_type", "nf4")
        name = self.ckpt.dtype_name(key)
        return f"{name}+scale" if kind and self._scale_key(key) else name

    def packed(self, key: str) -> Packed | None:
        kind = self.kinds.get(key)
        if kind is None:
            return None
        if kind == "nf4":
            parts = {p: self.ckpt.get(f"{key}.{p}") for p in _NF4_PARTS if f"{key}.{p}" in self.ckpt}
            return Packed("nf4", self.shape(key), {"weight": self.ckpt.get(key), **parts},
                          {"state": self._nf4_states[key]})
        scale_key = self._scale_key(key)
        scale = self.ckpt.get(scale_key).float().reshape(-1) if scale_key else torch.ones(1)
        return Packed("scaled", self.shape(key), {"weight": self.ckpt.get(key), "scale": scale})

    def get(self, key: str, rows: slice | None = None) -> Tensor:
        packed = self.packed(key)
        if packed is None:
            return self.ckpt.get(key, rows)
        from ..models.quant import dequantize_packed
        full = dequantize_packed(packed, torch.float32)
        return full if rows is None else full[rows].clone()

    def close(self) -> None:
        self.ckpt.close()

    def __enter__(self) -> "LowBitCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- writing --------------------------------------------------------------------------------------------------

def lowbit_tensors(packed: Mapping[str, Packed | Tensor], fmt: str) -> dict[str, Tensor]:
    """Tensors to write for a state dict whose eligible weights are already packed (models.quant.pack_weight)."""
    out: dict[str, Tensor] = {}
    for key, value in packed.items():
        if not isinstance(value, Packed):
            out[key] = value
        elif value.kind == "nf4":
            out[key] = value.tensors["weight"]
            for part in _NF4_PARTS:
                if part in value.tensors:
                    out[f"{key}.{part}"] = value.tensors[part]
            state = json.dumps(value.info["state"]).encode()
            out[f"{key}{_NF4_STATE}{value.info['state'].get('quant_type', 'nf4')}"] = \
                torch.tensor(list(state), dtype=torch.uint8)
        elif fmt == "fp8":
            out[key] = value.tensors["weight"]
            out[key.removesuffix(".weight") + ".scale_weight"] = value.tensors["scale"].reshape(())
        else:
            out[key] = value.tensors["weight"]
            out[key + "_scale"] = value.tensors["scale"]
    if fmt == "fp8":
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)  # ComfyUI's marker: its dtype is the format
    return out


def save_lowbit(tensors: Mapping[str, Packed | Tensor], path: str | os.PathLike, fmt: str,
                metadata: Mapping[str, str] | None = None) -> Path:
    """Write packed weights as safetensors in the convention of `fmt` (fp8 | int8 | nf4)."""
    if fmt not in ("fp8", "int8", "nf4"):
        raise ValueError(f"unknown low-bit format {fmt!r}; choose fp8, int8 or nf4")
    meta = {**(metadata or {}), "chromaflow.quantization": fmt}
    return save_checkpoint(lowbit_tensors(tensors, fmt), path, meta)
