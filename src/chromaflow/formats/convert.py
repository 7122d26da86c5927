"""`chromaflow convert`: a transformer checkpoint to any format we read, or a LoRA to another naming.

Models: original / diffusers safetensors, GGUF of any writable ggml type (streamed: one tensor in memory at a
time), ComfyUI scaled fp8, int8, bitsandbytes NF4. LoRAs: kohya <-> diffusers (exact: the same ΔW per layer).
The ModelSpec entries of the source are carried over (title and resolution may be replaced).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from . import ggml
from .checkpoint import CheckpointError, open_checkpoint
from .layouts import TransformerFile, _main_dtype, analyze, modelspec, save_transformer

MODEL_TARGETS = ("original", "diffusers", "fp8", "int8", "nf4")  # plus "gguf:<type>"
LORA_TARGETS = ("kohya", "diffusers")


class _LazyTensors(Mapping):
    """Original-layout tensors of a checkpoint, read (and expanded) only when asked for."""

    def __init__(self, tf: TransformerFile, dtype: torch.dtype | None = None):
        self.tf, self.dtype = tf, dtype

    def __getitem__(self, key: str) -> Tensor:
        t = self.tf.get(key)
        return t if self.dtype is None else t.to(self.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self.tf.plan)

    def __len__(self) -> int:
        return len(self.tf.plan)


def _carried(metadata: Mapping[str, str], architecture: str, title: str, layout: str,
             resolution: str | None) -> dict[str, str]:
    """ModelSpec for the output: fresh MUST keys, the source's other modelspec entries kept."""
    kept = {k: v for k, v in metadata.items() if k.startswith("modelspec.")}
    resolution = resolution or kept.get("modelspec.resolution")
    return {**kept, **modelspec(architecture, title, layout, resolution)}


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, to: str, *, dtype: torch.dtype | None = None,
                       title: str | None = None, resolution: str | None = None) -> Path:
    """Write the transformer in `src` (any format `open_checkpoint` reads) as `to`; returns the written path."""
    from ..models.quant import pack_weight, parse_format, quantizable
    from ..models.transformer import build
    dst = Path(dst)
    with open_checkpoint(src) as ckpt:
        tf = analyze(ckpt)
        title = title or ckpt.metadata.get("modelspec.title") or dst.stem
        if to in ("original", "diffusers"):
            dtype = dtype or _main_dtype(ckpt, tf.keymap.values())
            meta = _carried(ckpt.metadata, tf.architecture, title, to, resolution)
            state = {k: tf.get(k).to(dtype) for k in tf.plan}
            return save_transformer(state, dst, to, meta, params=tf.params, title=title, resolution=meta.get(
                "modelspec.resolution"))
        try:
            fmt = parse_format(to)
        except ValueError:
            raise ValueError(f"unknown target format {to!r}; valid: {', '.join(MODEL_TARGETS)}, or gguf:TYPE with "
                             f"TYPE one of {', '.join(t.name for t in ggml.WRITABLE)}") from None
        meta = {"chromaflow.params": json.dumps(tf.params.to_dict()), "chromaflow.layout": "original",
                **_carried(ckpt.metadata, tf.architecture, title, "original", resolution)}
        if not isinstance(fmt, str):
            from .gguf import save_gguf
            return save_gguf(_LazyTensors(tf, dtype), dst, fmt, metadata=meta, shapes=tf.shapes)
        linears = {f"{n}.weight" for n, m in build(tf.params, device="meta").named_modules()
                   if isinstance(m, nn.Linear)}
        tensors = {}
        for key in tf.plan:
            t = tf.get(key)
            tensors[key] = pack_weight(t, fmt) if key in linears and quantizable(key, tf.shapes[key], fmt) \
                else t.to(dtype or torch.bfloat16)
        from .lowbit import save_lowbit
        return save_lowbit(tensors, dst, fmt, meta)


def convert_lora(src: str | os.PathLike, dst: str | os.PathLike, to: str, base: str = "chroma") -> Path:
    """Rewrite a LoRA in kohya or diffusers naming; `base` (a preset name or a checkpoint) gives the layer shapes
    that fused / split names are matched against."""
    from ..models.lora import combined
    from ..models.transformer import PRESETS, build
    from .lora import linear_shapes, read_lora, save_lora
    if to not in LORA_TARGETS:
        raise ValueError(f"a LoRA converts to {' or '.join(LORA_TARGETS)}, got {to!r}")
    if base in PRESETS:
        params = PRESETS[base]
    else:
        with open_checkpoint(base) as ckpt:
            params = analyze(ckpt).params
    model = build(params, device="meta")
    shapes = linear_shapes(model)
    lora = read_lora(src, shapes, params.variant)
    adapters = {}
    for module in lora.patches:
        down, up = combined(lora, module, shapes[module + ".weight"][0], 1.0)
        adapters[module] = (down, up, float(down.shape[0]))  # scale folded into `up`: alpha = rank
    arch = "chroma" if params.variant == "chroma" else "flux-dev" if params.guidance_embed else "flux-schnell"
    return save_lora(adapters, dst, shapes, to, architecture=arch,
                     title=lora.metadata.get("modelspec.title") or Path(dst).stem,
                     resolution=lora.metadata.get("modelspec.resolution"))


def is_lora(path: str | os.PathLike) -> bool:
    """Whether a file's keys are LoRA up/down pairs (from its header alone)."""
    try:
        with open_checkpoint(path) as ckpt:
            keys = ckpt.keys()
    except CheckpointError:
        return False
    return any(k.endswith((".lora_down.weight", ".lora_A.weight", ".lora.down.weight", "_lora.down.weight"))
               for k in keys)
