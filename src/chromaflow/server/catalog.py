"""Which models the server offers and the pipelines it has loaded.

The model it was started with (the built-in `default` unless --model says otherwise) is always listed first in
every loader's list (ComfyUI's unet / clip / vae folders, A1111's sd-models), so a client's first request works
with nothing installed. Other entries are files and model folders under models/<folder>/ (ComfyUI's names).
Only the worker thread loads or switches models.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from .. import load
from ..pipeline.pipeline import Pipeline
from .files import FileError, Folders

# ComfyUI folder name -> the subfolders of models/ it reads (its folder_paths aliases)
FOLDERS = {"checkpoints": ("checkpoints",), "diffusion_models": ("diffusion_models", "unet"),
           "text_encoders": ("text_encoders", "clip"), "vae": ("vae",), "loras": ("loras",),
           "embeddings": ("embeddings",)}
WEIGHTS = (".safetensors", ".sft", ".gguf")
MODEL_FOLDERS = ("model.json", "model_index.json")  # a chromaflow / diffusers model folder counts as one entry


class Catalog:
    def __init__(self, folders: Folders, model: str, pipe: Pipeline | None = None, keep: int = 2):
        self.folders = folders
        self.builtin = model  # the served model's name as given on the command line
        self.current = model  # A1111's sd_model_checkpoint (switched with /options)
        self._loaded: OrderedDict[tuple, Pipeline] = OrderedDict()
        self.keep = keep  # pipelines kept loaded besides the current one
        if pipe is not None:
            self._loaded[(model, ())] = pipe

    def list(self, folder: str) -> list[str]:
        if folder not in FOLDERS:
            raise FileError(404, f"unknown model folder {folder!r}; valid: {', '.join(FOLDERS)}")
        names = [] if folder in ("loras", "embeddings") else [self.builtin]
        for sub in FOLDERS[folder]:
            root = self.folders.folder("models") / sub
            if root.is_dir():
                names += sorted(str(p.relative_to(root)) for p in root.rglob("*") if _is_model(p))
        return list(dict.fromkeys(names))

    def path(self, folder: str, name: str) -> Path | str:
        """A listed name -> the built-in name itself or its file / folder."""
        if name == self.builtin:
            return name
        for sub in FOLDERS[folder]:
            path = self.folders.resolve("models", sub, name)
            if path.exists():
                return path
        raise FileError(404, f"{name!r} is not in models/{folder} (GET /models/{folder} lists them)")

    def pipeline(self, model: str | None = None, text_encoder: str | None = None, vae: str | None = None,
                 loras: tuple = ()) -> Pipeline:
        """The pipeline for a model name (+ optional encoder / VAE files for a bare transformer, + LoRAs); the
        most recently used few stay loaded."""
        model = model or self.current
        key = (model, tuple(loras)) if text_encoder in (None, self.builtin) and vae in (None, self.builtin) \
            else (model, text_encoder, vae, tuple(loras))
        if key not in self._loaded:
            source = self.path("checkpoints" if model in self.list("checkpoints") else "diffusion_models", model)
            extra = {}
            if isinstance(source, Path) and source.is_file():  # a bare transformer needs its encoder and VAE
                extra = dict(text_encoder=self.path("text_encoders", text_encoder) if text_encoder else None,
                             vae=self.path("vae", vae) if vae else None)
            lora_files = [(self.path("loras", name), strength) for name, strength in loras]
            self._loaded[key] = load(source, loras=lora_files or None, **extra)
            while len(self._loaded) > self.keep + 1:
                self._loaded.popitem(last=False)
        self._loaded.move_to_end(key)
        return self._loaded[key]

    def hashes(self) -> dict[str, str]:
        """Loaded models' A1111 hashes (a file's is only known once loaded: hashing is a full read)."""
        return {key[0]: pipe.model_hash for key, pipe in self._loaded.items() if len(key) == 2 and not key[1]}

    def switch(self, model: str) -> Pipeline:
        """A1111's model switch (runs on the worker): load it, then make it the default."""
        pipe = self.pipeline(model)
        self.current = model
        return pipe


def _is_model(path: Path) -> bool:
    if path.is_dir():
        return any((path / m).is_file() for m in MODEL_FOLDERS)
    return path.suffix.lower() in WEIGHTS and not any((p / m).is_file() for p in path.parents for m in MODEL_FOLDERS)
