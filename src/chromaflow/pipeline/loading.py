"""`chromaflow.load(path_or_name)`: build a Pipeline from a built-in name, a model folder, or loose files.

Accepted:
- "default": the built-in model shipped in `chromaflow/builtin/` (random weights, with a warning, until trained);
- "tiny": a randomly initialised tiny model for tests;
- a chromaflow model folder (`model.json` + transformer + text_encoder/ + vae/);
- a diffusers pipeline folder (`model_index.json` with transformer/, text_encoder/, tokenizer/, vae/);
- a bare transformer checkpoint (original or diffusers layout, safetensors or GGUF) plus `text_encoder=` and
  `vae=` paths.
`quantize=` keeps the transformer's weights compact ("Q8_0", "Q4_K", "int8", "fp8", "nf4"); `loras=[(path,
strength), ...]` applies LoRA files (kohya, diffusers or original naming). Only local files are read; nothing is
downloaded.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, fields
from pathlib import Path

import torch

from .. import BUILTIN_DIR
from ..formats.checkpoint import atomic_write
from ..formats.layouts import load_transformer, save_transformer
from ..models.lora import LoRASpec, apply_loras
from ..models.quant import quantize_model
from ..models.text import ByteTextEncoder, ByteTextEncoderConfig, load_text_encoder
from ..models.transformer import build, preset
from ..models.vae import VAE, small_vae_config
from .pipeline import Defaults, Pipeline

# random-weight stand-ins: transformer preset, text encoder config, VAE config, generation defaults
_RANDOM = {
    "tiny": dict(preset="tiny", text=dict(width=32, depth=1, heads=2, max_length=64, out_dim=32),
                 vae=dict(block_out_channels=(8, 8, 8, 8), norm_num_groups=4), defaults=Defaults(64, 64, 4, 1.0)),
    "default": dict(preset="default", text=dict(), vae=dict(), defaults=Defaults(256, 256, 20, 4.0)),
}


def file_hash(path: Path) -> str:
    """A1111 'Model hash': the first 10 hex digits of the file's sha256."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()[:10]


def random_pipeline(name: str, seed: int = 0, device="cpu") -> Pipeline:
    """An untrained pipeline with deterministic random weights (for tests and before weights exist)."""
    spec = _RANDOM[name]
    torch.manual_seed(seed)
    transformer = build(preset(spec["preset"]))
    text = ByteTextEncoder(ByteTextEncoderConfig(**{**spec["text"], "out_dim": transformer.params.context_in_dim}))
    vae = VAE(small_vae_config(**spec["vae"]))
    return Pipeline(transformer, text, vae, name=f"{name}-random", model_hash="random", defaults=spec["defaults"],
                    device=device)


def _defaults(raw: dict | None, base: Defaults | None = None) -> Defaults:
    known = {f.name for f in fields(Defaults)}
    return Defaults(**{**(vars(base) if base else {}), **{k: v for k, v in (raw or {}).items() if k in known}})


def load_folder(folder: Path, device="cpu", dtype: torch.dtype | None = None, quantize: str | None = None) -> Pipeline:
    """A chromaflow model folder: model.json names the transformer file and the encoder / VAE folders."""
    manifest = json.loads((folder / "model.json").read_text())
    weights = folder / manifest.get("transformer", "transformer.safetensors")
    transformer, _ = load_transformer(weights, dtype=dtype, device=device, quantize=quantize)
    text = load_text_encoder(folder / manifest.get("text_encoder", "text_encoder"))
    vae = VAE.load(folder / manifest.get("vae", "vae"))
    return Pipeline(transformer, text, vae.to(device), name=manifest.get("name", folder.name),
                    model_hash=file_hash(weights), defaults=_defaults(manifest.get("defaults")), device=device)


def save_folder(pipe: Pipeline, folder: str | Path, card: str | None = None,
                dtype: torch.dtype | None = None) -> Path:
    """Write `pipe` as a chromaflow model folder that `load` reads back (model.json written last); `dtype`
    (e.g. bfloat16) stores the transformer's and text encoder's weights in that precision, which they then run in."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(dtype) if dtype is not None else v for k, v in pipe.transformer.state_dict().items()}
    save_transformer(state, folder / "transformer.safetensors", params=pipe.transformer.params, title=pipe.name,
                     resolution=f"{pipe.defaults.width}x{pipe.defaults.height}")
    if dtype is not None:
        pipe.text_encoder.to(dtype)  # exporting: the pipeline's own encoder is converted too
    pipe.text_encoder.save(folder / "text_encoder")
    pipe.vae.save(folder / "vae")
    if card is not None:
        with atomic_write(folder / "README.md", "w") as f:
            f.write(card)
    manifest = {"format": "chromaflow-model", "name": pipe.name, "transformer": "transformer.safetensors",
                "text_encoder": "text_encoder", "vae": "vae", "defaults": asdict(pipe.defaults)}
    with atomic_write(folder / "model.json", "w") as f:
        json.dump(manifest, f, indent=2)
    return folder


def load_diffusers_folder(folder: Path, device="cpu", dtype: torch.dtype | None = None,
                          quantize: str | None = None) -> Pipeline:
    transformer, _ = load_transformer(folder / "transformer", dtype=dtype, device=device, quantize=quantize)
    tokenizer = folder / "tokenizer" if (folder / "tokenizer").is_dir() else None
    text = load_text_encoder(folder / "text_encoder", tokenizer_path=tokenizer, dtype=dtype, device=device)
    vae = VAE.load(folder / "vae")
    return Pipeline(transformer, text, vae.to(device), name=folder.name, device=device)


def load(path_or_name: str | Path = "default", *, text_encoder: str | Path | None = None,
         vae: str | Path | None = None, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         quantize: str | None = None, loras: list[LoRASpec] | None = None, lora_mode: str = "auto",
         compile: bool = False) -> Pipeline:
    """A Pipeline; with `loras`, `pipe.applied_loras` holds what was applied (`.reports`, `.remove()`);
    `compile` torch.compiles the transformer blocks (Pipeline.compile)."""
    pipe = _load(path_or_name, text_encoder, vae, device, dtype, quantize)
    if loras:
        pipe.applied_loras = apply_loras(pipe.transformer, loras, lora_mode)
    return pipe.compile() if compile else pipe


def _load(path_or_name, text_encoder, vae, device, dtype, quantize) -> Pipeline:
    name = str(path_or_name)
    if name == "default":
        if (BUILTIN_DIR / "model.json").is_file():
            return load_folder(BUILTIN_DIR, device, dtype, quantize)
        warnings.warn("the built-in model has no trained weights yet: generating with RANDOM weights (noise images)")
        return random_pipeline("default", device=device)
    if name in _RANDOM:
        pipe = random_pipeline(name, device=device)
        if quantize:
            quantize_model(pipe.transformer, quantize)
        return pipe

    path = Path(name).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model {name!r}: no such file or folder, and not a built-in name "
                                f"(built-in: {', '.join(_RANDOM)})")
    if path.is_dir() and (path / "model.json").is_file():
        return load_folder(path, device, dtype, quantize)
    if path.is_dir() and (path / "model_index.json").is_file():
        return load_diffusers_folder(path, device, dtype, quantize)
    if text_encoder is None or vae is None:
        raise ValueError(f"{path} is a bare transformer checkpoint: pass text_encoder= (T5 folder) and vae= "
                         f"(VAE folder or ae.safetensors), or point at a model folder")
    transformer, _ = load_transformer(path, dtype=dtype, device=device, quantize=quantize)
    text = load_text_encoder(Path(text_encoder), dtype=dtype, device=device)
    return Pipeline(transformer, text, VAE.load(Path(vae)).to(device), name=path.stem,
                    model_hash=file_hash(path) if path.is_file() else "", device=device)
