"""chromaflow: Chroma-family rectified-flow text-to-image — train, sample, edit, accelerate, serve."""

__version__ = "0.1.0"


def load(path_or_name="default", **kwargs):
    """Build a text-to-image Pipeline from a built-in name or local files (see chromaflow.pipeline.loading)."""
    from .pipeline.loading import load as _load
    return _load(path_or_name, **kwargs)


__all__ = ["load", "__version__"]
