"""GGUF transformer files (city96 / ComfyUI-GGUF, stable-diffusion.cpp): read with memory mapping, write quantized.

Reading goes through the `gguf` package's reader (the file is memory-mapped; nothing is copied until a layer
needs it). Every tensor is checked before use: its type must be one we can expand, its bytes must lie inside the
file. Shapes are ggml's reversed (or `comfy.gguf.orig_shape.<name>` when present).

Writing follows what ComfyUI-GGUF and stable-diffusion.cpp load: `general.architecture = "flux"` (the
architecture string both accept for Flux and Chroma), original-layout tensor names without a prefix, 1-D tensors
and the small input / output / embedding layers in F32 / F16 (models.quant.keep_precision), everything else in
the requested type (F16 where a row does not fit the block size). chromaflow's own config (`chromaflow.params`) and
ModelSpec keys go in as strings.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT, GGUFReader, GGUFWriter, LlamaFileType
from torch import Tensor

from . import ggml
from .checkpoint import CheckpointError, Packed, atomic_write

_FILE_TYPES = {QT.F32: "ALL_F32", QT.F16: "MOSTLY_F16", QT.BF16: "MOSTLY_BF16", QT.Q8_0: "MOSTLY_Q8_0",
               QT.Q4_0: "MOSTLY_Q4_0", QT.Q4_1: "MOSTLY_Q4_1", QT.Q5_0: "MOSTLY_Q5_0", QT.Q5_1: "MOSTLY_Q5_1",
               QT.Q4_K: "MOSTLY_Q4_K_S", QT.Q5_K: "MOSTLY_Q5_K_S", QT.Q6_K: "MOSTLY_Q6_K"}
_TORCH = {QT.F32: torch.float32, QT.F16: torch.float16, QT.BF16: torch.bfloat16}


class _CheckedReader(GGUFReader):
    """The package's reader, with each tensor validated before it is mapped, so errors can name it."""

    def __init__(self, path: Path):
        self.path = path
        super().__init__(path, "r")

    def _build_tensors(self, start_offs: int, fields) -> None:
        size = len(self.data)
        for field in fields:
            _, name_data, _, dims, raw_type, offset = field.parts
            name = bytes(name_data).decode("utf-8", "replace")
            value = int(raw_type[0])
            try:
                t = QT(value)
            except ValueError:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} has unknown ggml quantization type {value}; the file is corrupt or "
                    f"from a newer tool: requantize it to one of {', '.join(x.name for x in ggml.SUPPORTED)}") from None
            if not ggml.readable(t):
                raise CheckpointError(f"{self.path}: tensor {name!r} has ggml type {t.name}, which cannot be read; "
                                      f"requantize it to one of {', '.join(x.name for x in ggml.SUPPORTED)}")
            block, type_size = GGML_QUANT_SIZES[t]
            n = math.prod(int(d) for d in dims)
            if int(dims[0]) % block:
                raise CheckpointError(f"{self.path}: tensor {name!r} ({t.name}) has rows of {int(dims[0])} values, "
                                      f"not a multiple of the block size {block}; the file is corrupt")
            end = start_offs + int(offset[0]) + n // block * type_size
            if end > size:
                raise CheckpointError(f"{self.path}: truncated: tensor {name!r} ends at byte {end:,} but the file has "
                                      f"{size:,} bytes; the download or conversion was interrupted: fetch it again")
        super()._build_tensors(start_offs, fields)


class GGUFCheckpoint:
    """A GGUF file behind the Checkpoint interface: logical shapes, `get` expands, `packed` stays quantized."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such file; check the path")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.reader = _CheckedReader(self.path)
        except CheckpointError:
            raise
        except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError, TypeError) as e:
            hint = "not a GGUF file" if "magic" in str(e).lower() else "truncated or corrupt GGUF header"
            raise CheckpointError(f"{self.path}: {hint} ({e}); re-download or re-convert it") from None
        self.files, self.config = [self.path], {}
        self.metadata: dict[str, str] = {}
        for name, field in self.reader.fields.items():
            if name.startswith("GGUF.") or name.startswith("comfy.gguf.orig_shape."):
                continue
            value = field.contents()
            if not isinstance(value, list) or len(value) <= 16:
                self.metadata[name] = value if isinstance(value, str) else json.dumps(value)
        self._tensors = {t.name: t for t in self.reader.tensors}

    @property
    def name(self) -> str:
        return str(self.path)

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def file(self, key: str) -> Path:
        return self.path

    def _tensor(self, key: str):
        try:
            return self._tensors[key]
        except KeyError:
            raise CheckpointError(f"{self.path}: has no tensor {key!r}") from None

    def tensor_type(self, key: str) -> QT:
        return QT(self._tensor(key).tensor_type)

    def shape(self, key: str) -> tuple[int, ...]:
        field = self.reader.get_field(f"comfy.gguf.orig_shape.{key}")
        if field is not None:
            return tuple(int(v) for v in field.contents())
        return tuple(int(d) for d in reversed(self._tensor(key).shape.tolist()))

    def numel(self, key: str) -> int:
        return math.prod(self.shape(key))

    def dtype(self, key: str) -> torch.dtype:
        return _TORCH.get(self.tensor_type(key), torch.uint8)

    def dtype_name(self, key: str) -> str:
        return self.tensor_type(key).name

    def _raw(self, key: str) -> Tensor:
        """The tensor's bytes (or F32 / F16 values) as a torch view of the memory map, one row per weight row."""
        t = self._tensor(key)
        data = np.asarray(t.data)
        shape = self.shape(key)
        rows = shape[0] if len(shape) > 1 else 1
        with warnings.catch_warnings():  # read-only map: nothing writes through these views
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.from_numpy(data)
        return raw.reshape(rows, -1) if len(shape) > 1 else raw.reshape(-1)

    def packed(self, key: str) -> Packed | None:
        """The quantized form of a 2-D tensor stored in anything but F32 (F16 / BF16 stay 16-bit in memory)."""
        t = self.tensor_type(key)
        if t == QT.F32 or len(self.shape(key)) != 2:
            return None
        return Packed("ggml", self.shape(key), {"raw": self._raw(key)}, {"type": t})

    def get(self, key: str, rows: slice | None = None) -> Tensor:
        """An owned tensor: F32 / F16 / BF16 as stored, quantized types expanded to float32."""
        t, shape = self.tensor_type(key), self.shape(key)
        raw = self._raw(key)
        if rows is not None and len(shape) > 1:
            raw = raw[rows]
            shape = (raw.shape[0], *shape[1:])
        out_dtype = _TORCH.get(t, torch.float32)
        return ggml.dequantize(raw, t, shape, out_dtype).clone()

    def close(self) -> None:
        self._tensors = {}
        self.reader = None  # drops the memory map once no layer holds a view of it

    def __enter__(self) -> "GGUFCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- writing --------------------------------------------------------------------------------------------------

def tensor_type(name: str, shape: tuple[int, ...], target: QT) -> QT:
    """The type a tensor is written in when the file's type is `target` (see the module docstring)."""
    if len(shape) < 2 or target == QT.F32:
        return QT.F32
    keep = _keep(name)
    if keep is not None:
        return QT[keep] if target not in (QT.F16, QT.BF16) or keep == "F32" else target
    if shape[-1] % ggml.block_size(target):
        return QT.F16
    return target


def _keep(name: str) -> str | None:
    from ..models.quant import keep_precision
    return keep_precision(name)


def save_gguf(tensors: Mapping[str, Tensor], path: str | os.PathLike, qtype: str | QT = "Q8_0", *,
              metadata: Mapping[str, str] | None = None, shapes: Mapping[str, tuple[int, ...]] | None = None) -> Path:
    """Write original-layout transformer tensors as GGUF, quantizing each one as it is written.

    `tensors` may be lazy (a mapping that builds each tensor on access): with `shapes` given, every tensor is read
    once, quantized and written before the next, so a model larger than memory can be written. Atomic."""
    target = ggml.qtype(qtype) if isinstance(qtype, str) else qtype
    if target not in ggml.WRITABLE:
        raise ValueError(f"cannot write GGUF type {target.name}; "
                         f"choose one of {', '.join(t.name for t in ggml.WRITABLE)}")
    path = Path(path)
    shapes = {k: tuple(shapes[k]) for k in tensors} if shapes is not None else \
        {k: tuple(t.shape) for k, t in tensors.items()}
    types = {k: tensor_type(k, s, target) for k, s in shapes.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    # GGUFWriter opens the path itself: we hand it atomic_write's temp file, which is fsynced and renamed at the end
    target_file = atomic_write(path)
    with target_file:
        writer = GGUFWriter(target_file.tmp, arch="flux")
        writer.add_quantization_version(2)
        writer.add_file_type(int(getattr(LlamaFileType, _FILE_TYPES[target])))
        meta = dict(metadata or {})
        if "modelspec.title" in meta:
            writer.add_name(meta["modelspec.title"])
        for key, value in meta.items():
            writer.add_string(key, str(value))
        for key, shape in shapes.items():
            t = types[key]
            writer.add_tensor_info(key, shape, np.dtype(np.float32), ggml.nbytes(t, shape), raw_dtype=t)
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for key, shape in shapes.items():
                tensor = tensors[key]
                if tuple(tensor.shape) != shape:
                    raise ValueError(f"tensor {key!r} has shape {tuple(tensor.shape)}, announced {shape}")
                writer.write_tensor_data(ggml.quantize(tensor, types[key]).numpy())
        finally:
            writer.close()
    return path
