"""Describe a checkpoint from its headers alone (no tensor data is read): backs `chromaflow info FILE --json`."""

from __future__ import annotations

import os
from collections import Counter

from .checkpoint import CheckpointError, open_checkpoint
from .layouts import analyze


def describe(path: str | os.PathLike) -> dict:
    """Layout, architecture, config, sizes, dtypes and metadata of a checkpoint. A file that is not a Chroma / Flux
    transformer (a VAE, a LoRA) is still described: layout, architecture and params are then None, `error` says why."""
    with open_checkpoint(path) as ckpt:
        keys = ckpt.keys()
        out = {"path": str(path), "files": [str(f) for f in ckpt.files], "layout": None, "architecture": None,
               "parameters": sum(ckpt.numel(k) for k in keys), "tensors": len(keys),
               "dtypes": dict(Counter(ckpt.dtype_name(k) for k in keys).most_common()),
               "metadata": dict(ckpt.metadata), "params": None}
        try:
            tf = analyze(ckpt)
        except CheckpointError as e:
            out["error"] = str(e)
        else:
            out.update(layout=tf.layout, architecture=tf.architecture, params=tf.params.to_dict(), prefix=tf.prefix)
    return out
