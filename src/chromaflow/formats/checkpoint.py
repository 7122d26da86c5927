"""Safetensors checkpoints: header validation, lazy one-tensor-at-a-time reads across shards, atomic writes.

Weights are only ever read from safetensors or GGUF; pickle-based files (.bin/.pt/.ckpt) are refused, never
unpickled. A `Checkpoint` reads headers up front (shapes, dtypes, metadata) and tensor data only on `get`.
`open_checkpoint` also opens GGUF files and safetensors holding low-bit weights (fp8 with scales, int8, NF4): those
objects answer the same questions, with logical shapes, `get` returning expanded weights and `packed` the compact form.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import signal
import struct
import sys
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

MAX_HEADER = 100_000_000  # the safetensors reference reader's limit
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"

# safetensors dtype name <-> torch dtype (the ones torch can hold unpacked)
DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64, "F16": torch.float16,
    "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64, "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz, "F8_E8M0": torch.float8_e8m0fnu,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the model; the message names the file and what to do."""


@dataclass
class Packed:
    """A weight kept in a compact storage format plus what expanding it needs (models.quant builds the Linear)."""
    kind: str  # "ggml" | "scaled" (int8 / fp8 with per-tensor or per-row scales) | "nf4" (bitsandbytes 4-bit)
    shape: tuple[int, ...]  # logical (out_features, in_features)
    tensors: dict[str, torch.Tensor]
    info: dict = field(default_factory=dict)  # ggml: {"type": GGMLQuantizationType}


def _refuse_pickle(path: Path) -> None:
    raise CheckpointError(f"{path}: refusing to load a pickle-based checkpoint (unpickling can run arbitrary code); "
                          "convert it to .safetensors with a trusted tool first")


def check_safetensors(path: str | os.PathLike) -> dict:
    """Validate a safetensors file without trusting it; return its parsed header (incl. `__metadata__` if any)."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        _refuse_pickle(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; check the path")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, too short for a header); "
                                  "re-download or re-export it")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or n < 2:
            hint = ("it looks like a PyTorch pickle/zip, which is refused: convert it to safetensors"
                    if head[:2] in (b"PK", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
                    else "expected a .safetensors checkpoint")
            raise CheckpointError(f"{path}: not a safetensors file (header length {n} is implausible); {hint}")
        if 8 + n > size:
            raise CheckpointError(f"{path}: truncated header (file is {size} bytes, header needs {8 + n}); "
                                  "the file is incomplete: re-download or re-export it")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: not a safetensors file (__metadata__ must map strings to strings)")
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, stop = entry["data_offsets"]
            ok = isinstance(entry["dtype"], str) and all(isinstance(d, int) and d >= 0 for d in entry["shape"])
            ok = ok and isinstance(begin, int) and isinstance(stop, int) and 0 <= begin <= stop
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{path}: not a safetensors file (malformed header entry for key {key!r})")
        end = max(end, stop)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated data (file is {size} bytes, header says {8 + n + end}); "
                              "the file is incomplete: re-download or re-export it")
    return header


class Checkpoint:
    """Lazy view of one safetensors file or a sharded set. Use as a context manager (or call `close`)."""

    def __init__(self, files: Iterable[str | os.PathLike], config: dict | None = None):
        self.files = [Path(f) for f in files]
        self.config = config or {}  # diffusers config.json beside the weights, if any
        self.metadata: dict[str, str] = {}
        self._entries: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
        self._offsets: dict[str, tuple[int, int]] = {}  # absolute byte range of each tensor in its file
        self._maps: dict[Path, mmap.mmap] = {}
        for file in self.files:
            header = check_safetensors(file)
            self.metadata.update(header.pop("__metadata__", {}))
            data_start = 8 + struct.unpack("<Q", file.open("rb").read(8))[0]
            for key, entry in header.items():
                if key in self._entries:
                    raise CheckpointError(f"{file}: key {key!r} is also in {self._entries[key][0]}; "
                                          "a shard set must not repeat keys")
                self._entries[key] = (file, entry["dtype"], tuple(entry["shape"]))
                begin, end = entry["data_offsets"]
                self._offsets[key] = (data_start + begin, data_start + end)

    @property
    def name(self) -> str:
        return str(self.files[0]) if len(self.files) == 1 else f"{self.files[0].parent}/ ({len(self.files)} shards)"

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def _entry(self, key: str) -> tuple[Path, str, tuple[int, ...]]:
        try:
            return self._entries[key]
        except KeyError:
            raise CheckpointError(f"{self.name}: has no tensor {key!r}") from None

    def file(self, key: str) -> Path:
        return self._entry(key)[0]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entry(key)[2]

    def numel(self, key: str) -> int:
        return math.prod(self.shape(key))

    def dtype(self, key: str) -> torch.dtype:
        file, name, _ = self._entry(key)
        if name not in DTYPES:
            raise CheckpointError(f"{file}: tensor {key!r} has dtype {name}, which torch cannot hold unpacked; "
                                  "dequantize the file first")
        return DTYPES[name]

    def dtype_name(self, key: str) -> str:
        """torch's name for the dtype ("bfloat16"), or the header's own name when torch has none ("F4")."""
        name = self._entry(key)[1]
        return str(DTYPES[name]).removeprefix("torch.") if name in DTYPES else name

    def packed(self, key: str) -> Packed | None:
        """The compact form of a low-bit weight; plain safetensors tensors have none."""
        return None

    def get(self, key: str, rows: slice | None = None) -> torch.Tensor:
        """Copy one tensor (or a range of its rows) out of the file's memory map into owned, aligned memory.

        The mapped pages are released right after the copy, so loading a model tensor by tensor peaks at one
        model plus one tensor, never the file twice (mapped pages would otherwise count towards RSS)."""
        file, _, shape = self._entry(key)
        dtype = self.dtype(key)
        begin, end = self._offsets[key]
        if rows is not None:
            row_bytes = (end - begin) // shape[0] if shape and shape[0] else 0
            start, stop, step = rows.indices(shape[0])
            if step != 1:
                raise ValueError(f"row slices must be contiguous, got step {step}")
            begin, end, shape = begin + start * row_bytes, begin + stop * row_bytes, (stop - start, *shape[1:])
        if file not in self._maps:
            with open(file, "rb") as f:
                self._maps[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        mm = self._maps[file]
        with warnings.catch_warnings():  # read-only buffer: we copy before anyone could write
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.frombuffer(mm, dtype=torch.uint8, count=end - begin, offset=begin) if end > begin \
                else torch.empty(0, dtype=torch.uint8)
        tensor = raw.clone().view(dtype).reshape(shape)
        page = mmap.PAGESIZE
        if hasattr(mm, "madvise") and end > begin:
            start = begin - begin % page
            mm.madvise(mmap.MADV_DONTNEED, start, min(len(mm), end) - start)
        return tensor

    def close(self) -> None:
        for mm in self._maps.values():
            mm.close()
        self._maps.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open_index(index: Path) -> Checkpoint:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a safetensors index (needs a JSON 'weight_map': {e!r})") from None
    files = list(dict.fromkeys(index.parent / name for name in weight_map.values()))
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"{index}: shard {file.name} is missing; download or copy every shard it lists")
    ckpt = Checkpoint(files, _read_config(index.parent))
    for key, name in weight_map.items():
        if key not in ckpt or ckpt.file(key).name != name:
            raise CheckpointError(f"{index}: lists {key!r} in {name}, but that shard does not contain it; "
                                  "the index and shards do not belong together")
    return ckpt


def _read_config(folder: Path) -> dict:
    """A diffusers model config beside the weights (only that kind: other config.json files are not ours)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) and "_class_name" in config else {}


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a .safetensors or .gguf file, a `*.safetensors.index.json` shard index, or a folder holding one of them
    (a diffusers `transformer/` folder, or a pipeline folder that has one). Low-bit safetensors (ComfyUI scaled fp8,
    int8, bitsandbytes NF4) come back wrapped so their weights read as logical tensors."""
    from . import lowbit
    return lowbit.wrap(_open(Path(path)))


def _open(path: Path):
    if path.suffix.lower() == ".gguf":
        from .gguf import GGUFCheckpoint
        return GGUFCheckpoint(path)
    if path.is_dir():
        if (path / "transformer").is_dir() and not any(path.glob("*.safetensors*")):
            path = path / "transformer"
        for name in (DIFFUSERS_WEIGHTS + ".index.json", DIFFUSERS_WEIGHTS):
            if (path / name).is_file():
                return _open(path / name)
        found = (sorted(path.glob("*.safetensors.index.json")) or sorted(path.glob("*.safetensors"))
                 or sorted(path.glob("*.gguf")))
        if len(found) == 1:
            return _open(found[0])
        if found:
            raise CheckpointError(f"{path}: holds several checkpoints ({', '.join(f.name for f in found)}); "
                                  "pass the file to use")
        if any(f.suffix.lower() in PICKLE_SUFFIXES for f in path.iterdir()):
            _refuse_pickle(path)
        raise CheckpointError(f"{path}: no .safetensors checkpoint in this folder; pass the file itself")
    if path.name.endswith(".index.json"):
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file; check the path")
        return _open_index(path)
    return Checkpoint([path], _read_config(path.parent))


def _payload(t: torch.Tensor) -> memoryview:
    """Raw little-endian bytes of a tensor without copying when it is already contiguous on the CPU."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def save_checkpoint(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                    metadata: Mapping[str, str] | None = None) -> Path:
    """Write a safetensors file atomically (temp file in the same folder, fsync, rename), streaming one tensor
    at a time so views (e.g. the slices of a fused qkv) are written without copies."""
    if sys.byteorder != "little":
        raise RuntimeError("safetensors is little-endian; writing from a big-endian host is not supported")
    path = Path(path)
    header: dict = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}} if metadata else {}
    offset = 0
    for key, t in tensors.items():
        if t.dtype not in DTYPE_NAMES or t.is_meta:
            raise CheckpointError(f"{path}: cannot write tensor {key!r} ({t.dtype} on {t.device}); "
                                  "materialize it as a supported dtype first")
        n = t.numel() * t.element_size()
        header[key] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # pad so the data buffer is 8-byte aligned, like the reference writer
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors.values():
            f.write(_payload(t))
    return path


_UMASK = os.umask(0)
os.umask(_UMASK)


class atomic_write:
    """`with atomic_write(path) as f:` writes to a temp file beside `path` and renames it into place on success."""

    def __init__(self, path: str | os.PathLike, mode: str = "wb"):
        self.path, self.mode = Path(path), mode

    def __enter__(self):
        fd, self.tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; the result should look like any file we create
        self.f = os.fdopen(fd, self.mode)
        return self.f

    def __exit__(self, exc_type, *rest) -> None:
        try:
            if exc_type is None:
                self.f.flush()
                os.fsync(self.f.fileno())
            self.f.close()
            if exc_type is None:
                os.replace(self.tmp, self.path)
                _fsync_dir(self.path.parent)
        finally:
            if os.path.exists(self.tmp):
                os.unlink(self.tmp)


@contextlib.contextmanager
def stop_on_signals():
    """While open, SIGINT / SIGTERM only record their number in the yielded dict's "signal", so a training loop
    can finish its step, save a checkpoint and stop, instead of dying mid-write. The old handlers come back after."""
    stop = {"signal": None}
    previous = {s: signal.signal(s, lambda num, frame: stop.update(signal=num))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _fsync_dir(folder: Path) -> None:
    try:  # makes the rename itself durable; not possible on every platform
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
