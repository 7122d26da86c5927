"""The Flux autoencoder: images <-> normalised 16-channel latents, and 2x2 latent packing (spec §6).

`VAE` wraps the KL autoencoder (`models.autoencoder`: diffusers' `AutoencoderKL`, the same network as BFL's
`AutoEncoder`, without importing diffusers) and applies the latent normalisation `z = scale * (mean - shift)`
itself, so the rest of chromaflow only ever sees normalised latents. Weights load from a local diffusers folder
or a BFL single-file `ae.safetensors`;
the original <-> diffusers key mapping is one function (`_original_key`) used in both directions.
`encode` / `decode` take `tile=` (pixels) to work tile by tile on large images: tiles overlap and are blended
with linear ramps across the overlap, so memory is bounded by the tile size and seams do not show.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from ..formats.checkpoint import DIFFUSERS_WEIGHTS as WEIGHTS_NAME, atomic_write, save_checkpoint
from .autoencoder import Autoencoder

# prefixes under which a single-file checkpoint may nest its autoencoder
_ORIGINAL_PREFIXES = ("first_stage_model.", "vae.", "ae.")


def flux_vae_config() -> dict:
    """diffusers config of the FLUX.1 / Chroma VAE (black-forest-labs/FLUX.1-dev `vae/config.json`)."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[128, 256, 512, 512],
        layers_per_block=2,
        act_fn="silu",
        latent_channels=16,
        norm_num_groups=32,
        sample_size=1024,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        latents_mean=None,
        latents_std=None,
        force_upcast=True,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    )


def downsample_factor(block_out_channels) -> int:
    """Pixels per latent cell along a side: every level after the first halves the image."""
    return 2 ** (len(block_out_channels) - 1)


def small_vae_config(block_out_channels=(32, 64, 128, 128), layers_per_block: int = 1, norm_num_groups: int = 8,
                     latent_channels: int = 16, scaling_factor: float = 1.0, shift_factor: float = 0.0) -> dict:
    """A Flux-shaped VAE at a fraction of the width: four levels downsample 8x (Flux's), five 16x."""
    block_out_channels = list(block_out_channels)
    if len(block_out_channels) not in (4, 5):
        raise ValueError(f"block_out_channels needs 4 levels (8x downsample) or 5 (16x), got {block_out_channels}")
    if any(c % norm_num_groups for c in block_out_channels):
        raise ValueError(f"norm_num_groups {norm_num_groups} must divide every block width {block_out_channels}")
    return {**flux_vae_config(), "block_out_channels": block_out_channels, "layers_per_block": layers_per_block,
            "norm_num_groups": norm_num_groups, "latent_channels": latent_channels, "sample_size": 256,
            "scaling_factor": scaling_factor, "shift_factor": shift_factor}


class VAE(nn.Module):
    """The autoencoder plus the latent normalisation; `encode`/`decode` speak images in [-1, 1]. Batches run one
    image at a time (`ae.slicing`), so image i of a batch equals image i made alone; training turns that off."""

    def __init__(self, config: Mapping):
        super().__init__()
        self.ae = Autoencoder(dict(config))

    @property
    def scaling_factor(self) -> float:
        return float(self.ae.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        return float(self.ae.config.shift_factor or 0.0)  # SD-style VAEs have none

    @property
    def latent_channels(self) -> int:
        return int(self.ae.config.latent_channels)

    @property
    def downsample(self) -> int:
        return downsample_factor(self.ae.config.block_out_channels)

    def encode(self, images: Tensor, tile: int | None = None, overlap: int | None = None) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> normalised latents (B, C, H/8, W/8); the posterior mean, as BFL does.
        `tile` / `overlap` (pixels, multiples of 8): encode tile by tile (overlap default: a quarter tile)."""
        d = self.downsample
        if images.shape[-2] % d or images.shape[-1] % d:
            raise ValueError(f"image size {tuple(images.shape[-2:])} must be divisible by {d}")
        p = next(self.parameters())
        images = images.to(p.device, p.dtype)
        encode = lambda x: self.ae.encode(x).mean  # noqa: E731
        mean = encode(images) if tile is None else tiled(encode, images, *self._tiling(tile, overlap), 1 / d)
        return (mean - self.shift_factor) * self.scaling_factor

    def decode(self, latents: Tensor, tile: int | None = None, overlap: int | None = None) -> Tensor:
        """Normalised latents -> images, nominally in [-1, 1] (not clamped). `tile` / `overlap` as in encode."""
        p = next(self.parameters())
        z = latents.to(p.device, p.dtype) / self.scaling_factor + self.shift_factor
        if tile is None:
            return self.ae.decode(z)
        d = self.downsample
        tile, overlap = self._tiling(tile, overlap)
        return tiled(self.ae.decode, z, tile // d, overlap // d, d)

    def _tiling(self, tile: int, overlap: int | None) -> tuple[int, int]:
        """Validated (tile, overlap) in pixels."""
        d = self.downsample
        overlap = (tile // 4) // d * d if overlap is None else overlap
        if tile < 2 * d or tile % d:
            raise ValueError(f"VAE tile must be a multiple of {d} pixels, at least {2 * d}; got {tile}")
        if overlap < 0 or overlap % d or overlap >= tile:
            raise ValueError(f"VAE tile overlap must be a multiple of {d} pixels below the tile ({tile}); "
                             f"got {overlap}")
        return tile, overlap

    def original_state_dict(self) -> dict[str, Tensor]:
        """The weights in BFL's single-file layout (`ae.safetensors`: `encoder.down.0.block.0...`)."""
        n = len(self.ae.config.block_out_channels)
        out = {}
        for key, value in self.ae.state_dict().items():
            new = _original_key(key, n)
            out[new] = value[..., None, None] if ".attn_1." in new and value.ndim == 2 else value  # 1x1 convs
        return out

    def to_diffusers(self, dtype: torch.dtype | None = None):
        """The same weights as a diffusers AutoencoderKL, in `dtype` (default: ours), e.g. for a diffusers pipeline."""
        from diffusers import AutoencoderKL
        ae = AutoencoderKL.from_config(json.loads(self.ae.config.to_json_string()))
        ae.load_state_dict(self.ae.state_dict())
        return ae.to(dtype or next(self.parameters()).dtype)

    def save(self, folder: str | Path) -> None:
        """Write a diffusers-format folder (config.json + diffusion_pytorch_model.safetensors)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_checkpoint(self.ae.state_dict(), folder / WEIGHTS_NAME, metadata={"format": "pt"})
        with atomic_write(folder / "config.json", "w") as f:
            f.write(self.ae.config.to_json_string())

    @classmethod
    def load(cls, path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
             **config_overrides) -> VAE:
        """Load a diffusers VAE folder (or a pipeline folder with vae/) or a BFL-layout single .safetensors file.

        A single file carries no config: the architecture is read off the tensor shapes and the rest
        (norm_num_groups, scaling_factor, shift_factor, ...) defaults to Flux's unless overridden here.
        """
        path = Path(path)
        if path.is_dir():
            folder = path / "vae" if not (path / "config.json").exists() and (path / "vae").is_dir() else path
            config_file, weights_file = folder / "config.json", folder / WEIGHTS_NAME
            if not config_file.exists() or not weights_file.exists():
                raise FileNotFoundError(f"{folder} is not a diffusers VAE folder: needs config.json and {WEIGHTS_NAME}"
                                        f" (pickled .bin weights are not loaded)")
            try:
                config = json.loads(config_file.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{config_file}: invalid JSON ({e})") from None
            vae = cls({**config, **config_overrides})
            _load_into(vae.ae, _read_safetensors(weights_file), weights_file)
        elif path.is_file():
            sd = _strip_prefix(_read_safetensors(path))
            if any("down_blocks." in k or "up_blocks." in k for k in sd):
                raise ValueError(f"{path} is in diffusers layout; load the folder holding it and its config.json")
            if "encoder.conv_in.weight" not in sd:
                raise ValueError(f"{path} does not look like an autoencoder (no encoder.conv_in.weight)")
            try:
                config = _config_from_original(sd)
            except (KeyError, ValueError) as e:
                raise ValueError(f"{path}: incomplete autoencoder checkpoint ({e})") from None
            vae = cls({**config, **config_overrides})
            n = len(vae.ae.config.block_out_channels)
            to_diffusers = {_original_key(k, n): k for k in vae.ae.state_dict()}
            _load_into(vae.ae, {to_diffusers.get(k, k): v for k, v in sd.items()}, path)  # unmapped keys stay
        else:
            raise FileNotFoundError(f"VAE path not found: {path}")
        return vae.to(device=device, dtype=dtype).eval()


load_vae = VAE.load


def tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Starts of windows `tile` long, `stride` apart, covering [0, size): the last one ends at the edge (so it
    may overlap its neighbour more), and a tile at least `size` long is one window at 0."""
    if tile >= size:
        return [0]
    return list(range(0, size - tile, stride)) + [size - tile]


def _ramp(n: int, width: int, rise: bool, fall: bool) -> Tensor:
    """Blend weights along one side of a tile: linear over `width` at each end that meets a neighbour, never 0."""
    i = torch.arange(n, dtype=torch.float32)
    w = torch.ones(n)
    if rise:
        w = torch.minimum(w, (i + 1) / (width + 1))
    if fall:
        w = torch.minimum(w, (n - i) / (width + 1))
    return w


def tiled(fn: Callable[[Tensor], Tensor], x: Tensor, tile: int, overlap: int, scale: float) -> Tensor:
    """fn over overlapping square tiles of x (B, C, H, W), blended: fn maps a tile of side n to one of side
    n * scale; each output pixel is the ramp-weighted mean of the tiles covering it. Sizes in x's units."""
    (H, W), step = x.shape[-2:], tile - overlap
    out = weight = None
    for y in tile_starts(H, tile, step):
        for x0 in tile_starts(W, tile, step):
            piece = fn(x[..., y:y + tile, x0:x0 + tile]).float()
            if out is None:
                out = piece.new_zeros(*piece.shape[:2], round(H * scale), round(W * scale))
                weight = piece.new_zeros(round(H * scale), round(W * scale))
            (h, w), top, left, ramp = piece.shape[-2:], round(y * scale), round(x0 * scale), round(overlap * scale)
            wy = _ramp(h, ramp, y > 0, y + tile < H).to(piece.device)
            wx = _ramp(w, ramp, x0 > 0, x0 + tile < W).to(piece.device)
            out[..., top:top + h, left:left + w] += piece * (wy[:, None] * wx)
            weight[top:top + h, left:left + w] += wy[:, None] * wx
    return out / weight


def pack(latents: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, (h/2)(w/2), 4C): 2x2 patches, feature index c*4 + ph*2 + pw (BFL, diffusers)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent size {h}x{w} must be even to pack 2x2 patches")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: Tensor, h: int, w: int) -> Tensor:
    """Inverse of `pack`; h, w are the latent (not pixel) height and width."""
    b, n, d = tokens.shape
    if n != (h // 2) * (w // 2) or h % 2 or w % 2 or d % 4:
        raise ValueError(f"cannot unpack {tuple(tokens.shape)} tokens to a {h}x{w} latent")
    x = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


# --- original (BFL) <-> diffusers layout -------------------------------------------------------------------------

_ATTN_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _original_key(key: str, levels: int) -> str:
    """diffusers AutoencoderKL key -> BFL key. BFL numbers decoder levels by resolution, diffusers by order."""
    up = lambda m: f"up.{levels - 1 - int(m[1])}."  # noqa: E731
    key = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", key)
    key = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", key)
    key = re.sub(r"up_blocks\.(\d+)\.resnets\.", lambda m: up(m) + "block.", key)
    key = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: up(m) + "upsample.", key)
    key = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", key)
    key = re.sub(r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.",
                 lambda m: f"mid.attn_1.{_ATTN_NAMES[m[1]]}.", key)
    return key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")


def _config_from_original(sd: Mapping[str, Tensor]) -> dict:
    """Architecture of a BFL-layout checkpoint, read off its shapes, on top of Flux's config."""
    levels = 1 + max(int(m[1]) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k)))
    blocks = {int(m[1]) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
    return {**flux_vae_config(),
            "in_channels": sd["encoder.conv_in.weight"].shape[1],
            "out_channels": sd["decoder.conv_out.weight"].shape[0],
            "block_out_channels": [sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)],
            "down_block_types": ["DownEncoderBlock2D"] * levels,
            "up_block_types": ["UpDecoderBlock2D"] * levels,
            "layers_per_block": len(blocks),
            "latent_channels": sd["decoder.conv_in.weight"].shape[1],
            "use_quant_conv": "quant_conv.weight" in sd,
            "use_post_quant_conv": "post_quant_conv.weight" in sd,
            "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in sd}


def _strip_prefix(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    for prefix in _ORIGINAL_PREFIXES:
        if any(k.startswith(prefix + "encoder.") for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def _load_into(model: nn.Module, sd: Mapping[str, Tensor], source: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not match the VAE config; missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    # BFL stores the attention projections as 1x1 convs: (C, C, 1, 1) -> (C, C)
    sd = {k: v[:, :, 0, 0] if v.ndim == 4 and expected[k].ndim == 2 and v.shape[2:] == (1, 1) else v
          for k, v in sd.items()}
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise ValueError(f"{source}: tensor shapes do not match the VAE config: {e}") from None


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
