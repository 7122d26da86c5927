"""Describe a checkpoint from its headers alone (no tensor data is read): backs `chromaflow info FILE --json`."""

from __future__ import annotations

import os
from collections import Counter

from .checkpoint import CheckpointError, open_checkpoint
from .layouts import analyze, read_modelspec

_LORA_DOWN = (".lora_down.weight", ".lora_A.weight", ".lora.down.weight", "_lora.down.weight",
              ".lora_linear_layer.down.weight")


def _format(ckpt) -> str:
    if getattr(ckpt, "reader", None) is not None or str(ckpt.name).endswith(".gguf"):
        return "gguf"
    kinds = set(getattr(ckpt, "kinds", {}).values())
    return "safetensors" + (f" ({', '.join(sorted(kinds))})" if kinds else "")


def _lora_summary(ckpt) -> dict | None:
    downs = [k for k in ckpt.keys() if k.endswith(_LORA_DOWN)]
    if not downs:
        return None
    ranks = Counter(ckpt.shape(k)[0] for k in downs)
    kohya = any(k.startswith(("lora_unet_", "lora_transformer_")) for k in downs)
    diffusers = any("transformer_blocks." in k for k in downs)
    return {"layout": "kohya" if kohya else "diffusers" if diffusers else "original", "layers": len(downs),
            "ranks": dict(ranks.most_common()), "has_alpha": any(k.endswith(".alpha") for k in ckpt.keys())}


def describe(path: str | os.PathLike) -> dict:
    """Format, layout, architecture, config, sizes, dtypes (ggml types for GGUF), ModelSpec and metadata of a
    checkpoint. A LoRA is summarised (layout, ranks); a file that is neither a Chroma / Flux transformer nor a LoRA
    is still described: layout, architecture and params are then None, `error` says why."""
    with open_checkpoint(path) as ckpt:
        keys = ckpt.keys()
        out = {"path": str(path), "files": [str(f) for f in ckpt.files], "format": _format(ckpt),
               "size_bytes": sum(os.path.getsize(f) for f in ckpt.files), "layout": None, "architecture": None,
               "parameters": sum(ckpt.numel(k) for k in keys), "tensors": len(keys),
               "dtypes": dict(Counter(ckpt.dtype_name(k) for k in keys).most_common()),
               "modelspec": read_modelspec(ckpt.metadata), "metadata": dict(ckpt.metadata), "params": None}
        lora = _lora_summary(ckpt)
        if lora is not None:
            out.update(kind="lora", lora=lora, layout=lora["layout"])
            return out
        try:
            tf = analyze(ckpt)
        except CheckpointError as e:
            out["error"] = str(e)
        else:
            out.update(kind="transformer", layout=tf.layout, architecture=tf.architecture,
                       params=tf.params.to_dict(), prefix=tf.prefix)
    return out
