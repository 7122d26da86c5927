"""The KL autoencoder network of Flux / SD3 (diffusers `AutoencoderKL` with its encoder / decoder blocks), in
diffusers' key layout, written here so that generating needs no diffusers import (~7 s of start-up on a slow
core). Same weights, same config.json and, with diffusers installed, numerically the same as its AutoencoderKL
(tests/test_vae.py compares them).

Encoder: conv -> per level (resnets, stride-2 downsample except the last) -> mid (resnet, attention, resnet)
-> norm, SiLU, conv to 2 x latent channels (mean, log-variance). The decoder mirrors it with one more resnet
per level and nearest-neighbour 2x upsampling.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EPS = 1e-6  # every GroupNorm of the network


def _norm(groups: int, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=EPS, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(groups, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(groups, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Single-head self-attention over all pixels, pre-normed, residual (the mid block's)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = _norm(groups, channels)
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, channels) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        seq = self.group_norm(x).view(b, c, h * w).transpose(1, 2)
        q, k, v = (proj(seq)[:, None] for proj in (self.to_q, self.to_k, self.to_v))
        out = self.to_out[0](F.scaled_dot_product_attention(q, k, v)[:, 0])
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([Attention(channels, groups)] if attention else [])

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad: an even side halves exactly


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of the encoder or decoder: resnets, then an optional resampler."""

    def __init__(self, cin: int, cout: int, layers: int, groups: int, resample: type[nn.Module] | None, attr: str):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(layers)])
        self.resample_attr = attr  # the checkpoint's name for it: "downsamplers" or "upsamplers"
        setattr(self, attr, nn.ModuleList([resample(cout)] if resample else []))

    def forward(self, x: Tensor) -> Tensor:
        for block in self.resnets:
            x = block(x)
        for resample in getattr(self, self.resample_attr):
            x = resample(x)
        return x


class Encoder(nn.Module):
    def __init__(self, c: "AutoencoderConfig"):
        super().__init__()
        ch, g = c.block_out_channels, c.norm_num_groups
        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            Level(ch[max(i - 1, 0)], ch[i], c.layers_per_block, g, Downsample if i < len(ch) - 1 else None,
                  "downsamplers") for i in range(len(ch))])
        self.mid_block = MidBlock(ch[-1], g, c.mid_block_add_attention)
        self.conv_norm_out = _norm(g, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], 2 * c.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for level in self.down_blocks:
            x = level(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, c: "AutoencoderConfig"):
        super().__init__()
        ch, g = list(reversed(c.block_out_channels)), c.norm_num_groups
        self.conv_in = nn.Conv2d(c.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, c.mid_block_add_attention)
        self.up_blocks = nn.ModuleList([
            Level(ch[max(i - 1, 0)], ch[i], c.layers_per_block + 1, g, Upsample if i < len(ch) - 1 else None,
                  "upsamplers") for i in range(len(ch))])
        self.conv_norm_out = _norm(g, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], c.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            x = level(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


@dataclass
class Posterior:
    """The encoder's diagonal Gaussian over latents (log-variance clamped to [-30, 20], as diffusers does)."""
    mean: Tensor
    logvar: Tensor


_BLOCK_TYPES = {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}


@dataclass
class AutoencoderConfig:
    """The fields of diffusers' AutoencoderKL config.json this network reads (set them to change the saved config);
    `raw` keeps the whole file."""
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    raw: dict = field(default_factory=lambda: {"_class_name": "AutoencoderKL"})

    @classmethod
    def from_dict(cls, raw: dict) -> "AutoencoderConfig":
        for key, kind in _BLOCK_TYPES.items():
            if any(t != kind for t in raw.get(key, [kind])):
                raise ValueError(f"VAE config {key} {raw[key]}: only {kind} blocks (the Flux / SD3 autoencoder) "
                                 f"are supported")
        act = raw.get("act_fn", "silu")
        if act != "silu":
            raise ValueError(f"VAE config act_fn {act!r}: only 'silu' is supported")
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw and k != "raw"}
        config = cls(**known, raw={"_class_name": "AutoencoderKL", **raw})
        config.block_out_channels = list(config.block_out_channels)
        return config

    def to_json_string(self) -> str:
        """The file read (other diffusers fields kept as they were) with this network's fields as they are now."""
        fields = {k: v for k, v in asdict(self).items() if k != "raw"}
        return json.dumps({**self.raw, **fields}, indent=2, sort_keys=True) + "\n"


class Autoencoder(nn.Module):
    """encode(images) -> Posterior; decode(latents) -> images. With `slicing`, a batch runs one image at a time:
    CPU convs are not bit-identical across batch sizes, and image i of a batch must equal image i made alone."""

    def __init__(self, config: dict | AutoencoderConfig):
        super().__init__()
        self.config = config if isinstance(config, AutoencoderConfig) else AutoencoderConfig.from_dict(dict(config))
        c = self.config
        self.encoder, self.decoder = Encoder(c), Decoder(c)
        self.quant_conv = nn.Conv2d(2 * c.latent_channels, 2 * c.latent_channels, 1) if c.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c.latent_channels, c.latent_channels, 1) if c.use_post_quant_conv else None
        self.slicing = True

    def _sliced(self, fn, x: Tensor) -> Tensor:
        return torch.cat([fn(row) for row in x.split(1)]) if self.slicing and x.shape[0] > 1 else fn(x)

    def _moments(self, x: Tensor) -> Tensor:
        h = self.encoder(x)
        return h if self.quant_conv is None else self.quant_conv(h)

    def _decode(self, z: Tensor) -> Tensor:
        return self.decoder(z if self.post_quant_conv is None else self.post_quant_conv(z))

    def encode(self, x: Tensor) -> Posterior:
        mean, logvar = self._sliced(self._moments, x).chunk(2, dim=1)
        return Posterior(mean, logvar.clamp(-30.0, 20.0))

    def decode(self, z: Tensor) -> Tensor:
        return self._sliced(self._decode, z)
