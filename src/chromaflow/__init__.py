"""chromaflow: Chroma-family rectified-flow text-to-image — train, sample, edit, accelerate, serve."""

import logging
from pathlib import Path

__version__ = "0.1.0"
BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"  # the shipped model's folder (also a training base)

# diffusers imports bitsandbytes whenever it is installed, and bitsandbytes' CPU backend then logs a warning about an
# optional kernel package; the fallback it uses is fine, so keep that line out of every command's output
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def load(path_or_name="default", **kwargs):
    """Build a text-to-image Pipeline from a built-in name or local files (see chromaflow.pipeline.loading)."""
    from .pipeline.loading import load as _load
    return _load(path_or_name, **kwargs)


__all__ = ["load", "BUILTIN_DIR", "__version__"]
