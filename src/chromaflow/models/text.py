"""Text encoders behind one interface, `encode(prompts) -> TextEncoding`, plus Chroma's attention-mask rule.

Two encoders: `T5TextEncoder` (T5-XXL for real Chroma / Flux checkpoints, loaded from local folders only)
and `ByteTextEncoder`, a small transformer over UTF-8 bytes that the built-in model trains from scratch:
no vocabulary file, any language. Both return the tokenizer's mask (real tokens + EOS); the DiT-side
mask comes from `chroma_mask` (spec chroma-architecture.md §2.6-2.7).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from ..formats.checkpoint import atomic_write, save_checkpoint
from .precision import run_fast
from .transformer import apply_rope, position_embedding

MARKER = "chromaflow_model"  # config.json field that identifies our own encoder folders
WEIGHTS_NAME = "model.safetensors"


@dataclass
class TextEncoding:
    embeds: Tensor  # (B, L, D)
    mask: Tensor  # (B, L) bool: real tokens incl. EOS


class TextEncoder(Protocol):
    out_dim: int
    max_length: int

    def encode(self, prompts: list[str]) -> TextEncoding: ...


def chroma_mask(mask: Tensor, extra_pads: int = 1) -> Tensor:
    """Chroma's rule: real tokens + EOS + the first `extra_pads` pads (where they fit) visible, the rest hidden.

    `mask` is a right-padded tokenizer mask (B, L); the result is bool (B, L).
    """
    n = mask.sum(-1, keepdim=True)
    return torch.arange(mask.shape[-1], device=mask.device) < n + extra_pads


# --- byte-level encoder ------------------------------------------------------------------------------------------

class ByteTokenizer:
    """UTF-8 bytes -> ids; pad = 0, eos = 1, byte b -> b + 2. Truncation keeps the EOS."""

    pad_id, eos_id, offset = 0, 1, 2
    vocab_size = 256 + offset

    def __init__(self, max_length: int = 128):
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.max_length = max_length

    def __call__(self, prompts: str | list[str], padding: str = "max_length") -> tuple[Tensor, Tensor]:
        """-> ids (B, L) long, mask (B, L) bool; padding "max_length" or "longest"."""
        if padding not in ("max_length", "longest"):
            raise ValueError(f"padding must be 'max_length' or 'longest', got {padding!r}")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        rows = [[b + self.offset for b in p.encode("utf-8")[: self.max_length - 1]] + [self.eos_id] for p in prompts]
        # "longest" keeps one pad slot after the longest row (room permitting): Chroma's mask shows one pad, and
        # with it "longest" encodes exactly what "max_length" does for every visible token, at a fraction of the cost
        longest = min(self.max_length, max(map(len, rows), default=1) + 1)
        length = self.max_length if padding == "max_length" else longest
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
        return ids, ids != self.pad_id

    def decode(self, ids: Tensor) -> list[str]:
        """Inverse of `__call__` up to truncation (a cut multi-byte character becomes U+FFFD)."""
        return [bytes(i - self.offset for i in row.tolist() if i >= self.offset).decode("utf-8", errors="replace")
                for row in ids]


@dataclass(frozen=True)
class ByteTextEncoderConfig:
    vocab_size: int = ByteTokenizer.vocab_size
    width: int = 256
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    max_length: int = 128  # bytes incl. EOS
    out_dim: int = 256  # = the DiT's context_in_dim
    pool: int = 1  # bytes merged per output token (a strided conv, as in CANINE): fewer tokens for the DiT
    # width of that conv; 0 = pool. Wider groups overlap their neighbours, so a word cut by the grid is still seen
    # whole (held-out all-correct +11 points at 1500 steps, pool 4: width 8 against 4)
    pool_kernel: int = 0
    # > 0: rotary positions (this base) on the tokens' attention, so each token sees where words stand relative to
    # it; 0: only the learned absolute positions added to the bytes
    rope_theta: float = 0.0

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.pool_width < self.pool or (self.pool_width - self.pool) % 2:
            raise ValueError(f"pool_kernel {self.pool_kernel} must be >= pool {self.pool} and differ from it by "
                             f"an even number (the overlap is split evenly on both sides)")
        if self.vocab_size < ByteTokenizer.vocab_size:
            raise ValueError(f"vocab_size must be >= {ByteTokenizer.vocab_size}, got {self.vocab_size}")
        if self.rope_theta < 0 or (self.rope_theta and self.head_width % 2):
            raise ValueError(f"rope_theta must be >= 0 (0 = off) and needs an even head width (width / heads); got "
                             f"rope_theta {self.rope_theta}, head width {self.head_width}")

    @property
    def head_width(self) -> int:
        return self.width // self.heads

    @property
    def pool_width(self) -> int:
        """Bytes each pooling window reads (pool_kernel, or pool when that is 0)."""
        return self.pool_kernel or self.pool


class _Block(nn.Module):
    """Pre-norm transformer block; pads are hidden as keys, so real tokens never see them."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))

    def forward(self, x: Tensor, key_mask: Tensor, pe: Tensor | None) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if pe is not None:
            q, k = apply_rope(q, pe), apply_rope(k, pe)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class ByteTextEncoder(nn.Module):
    """Small trainable transformer encoder over UTF-8 bytes (learned absolute positions)."""

    def __init__(self, config: ByteTextEncoderConfig | None = None):
        super().__init__()
        self.config = config = config or ByteTextEncoderConfig()
        self.tokenizer = ByteTokenizer(config.max_length)
        self.embed = nn.Embedding(config.vocab_size, config.width)
        self.pos = nn.Parameter(torch.zeros(config.max_length + 2 * config.pool, config.width))
        if config.pool > 1:
            self.downsample = nn.Conv1d(config.width, config.width, config.pool_width, stride=config.pool,
                                        padding=(config.pool_width - config.pool) // 2)
        self.blocks = nn.ModuleList(_Block(config.width, config.heads, config.mlp_ratio) for _ in range(config.depth))
        self.norm_out = nn.LayerNorm(config.width)
        self.out = nn.Linear(config.width, config.out_dim)
        nn.init.normal_(self.embed.weight, std=1.0)  # unit-scale bytes: small ones let the encoder collapse to a constant
        nn.init.normal_(self.pos, std=0.02)

    @property
    def out_dim(self) -> int:
        return self.config.out_dim

    @property
    def max_length(self) -> int:
        return self.config.max_length

    def forward(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """ids (B, L) long, mask (B, L) bool (L a multiple of `pool`) -> (B, L/pool, out_dim), pooled mask."""
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        p = self.config.pool
        if p > 1:  # merge each group of p bytes; zeroed pads cannot leak into a group's real bytes
            x = self.downsample((x * mask[..., None]).transpose(1, 2)).transpose(1, 2)
            mask = mask.view(mask.shape[0], -1, p).any(-1)
        key_mask = mask[:, None, None, :]  # (B, 1, 1, L): every query sees only real tokens
        pe = None
        if self.config.rope_theta:  # one position axis: the token index
            ids = torch.arange(x.shape[1], device=x.device)[None, :, None]
            pe = position_embedding(ids, (self.config.head_width,), self.config.rope_theta)
        for block in self.blocks:
            x = block(x, key_mask, pe)
        return self.out(self.norm_out(x)), mask

    def encode(self, prompts: list[str], padding: str = "longest") -> TextEncoding:
        ids, mask = self.tokenizer(prompts, padding=padding)
        p = self.config.pool
        if p > 1:  # whole groups, and always one group of pure padding: the pad Chroma's mask shows
            groups = -(-int(mask.sum(1).max()) // p) + 1
            extra = max(groups * p, -(-ids.shape[1] // p) * p) - ids.shape[1]
            ids, mask = F.pad(ids, (0, extra), value=ByteTokenizer.pad_id), F.pad(mask, (0, extra), value=False)
        device = self.embed.weight.device
        embeds, mask = self(ids.to(device), mask.to(device))
        return TextEncoding(embeds, mask)

    def save(self, folder: str | Path) -> None:
        """config.json (with the marker field) + model.safetensors."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_checkpoint(self.state_dict(), folder / WEIGHTS_NAME, metadata={"format": "pt"})
        with atomic_write(folder / "config.json", "w") as f:
            json.dump({MARKER: "ByteTextEncoder", **asdict(self.config)}, f, indent=2)

    @classmethod
    def load(cls, folder: str | Path, *, dtype: torch.dtype | None = None,
             device: str | torch.device | None = None) -> ByteTextEncoder:
        folder = Path(folder)
        config = _read_config(folder)
        if config is None or config.pop(MARKER, None) != "ByteTextEncoder":
            raise ValueError(f"{folder} is not a ByteTextEncoder folder (config.json without {MARKER!r})")
        weights = folder / WEIGHTS_NAME
        if not weights.exists():
            raise FileNotFoundError(f"{weights} not found")
        try:
            model = cls(ByteTextEncoderConfig(**config))
            model.load_state_dict(load_file(weights))
        except (TypeError, SafetensorError, OSError, RuntimeError) as e:
            raise ValueError(f"{weights}: cannot load ByteTextEncoder weights ({e})") from None
        return model.to(device=device, dtype=dtype)


# --- T5 ----------------------------------------------------------------------------------------------------------

_TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json")


class T5TextEncoder(nn.Module):
    """Frozen T5 encoder run WITH the tokenizer mask (Chroma, unlike Flux); local folders only.

    `path` is a folder with config.json + safetensors weights (and the tokenizer, unless `tokenizer_path`
    is given or a sibling `tokenizer/` exists), or a diffusers pipeline folder with text_encoder/ and tokenizer/.
    """

    def __init__(self, path: str | Path, tokenizer_path: str | Path | None = None, max_length: int = 512,
                 dtype: torch.dtype | None = None, device: str | torch.device | None = None):
        super().__init__()
        from transformers import AutoTokenizer, T5EncoderModel

        enc_dir, tok_dir = _t5_folders(Path(path), tokenizer_path)
        self.max_length = max_length
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"cannot load a T5 tokenizer from {tok_dir}: {e}") from None
        try:  # use_safetensors: never fall back to unpickling a .bin
            self.model = T5EncoderModel.from_pretrained(enc_dir, local_files_only=True, use_safetensors=True,
                                                        dtype=dtype)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"cannot load a T5 encoder (safetensors) from {enc_dir}: {e}") from None
        self.model.requires_grad_(False).eval().to(device)

    @property
    def out_dim(self) -> int:
        return self.model.config.d_model

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> TextEncoding:
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                                return_tensors="pt")
        device = self.model.device
        ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        embeds = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return TextEncoding(embeds, mask.bool())


def _t5_folders(path: Path, tokenizer_path: str | Path | None) -> tuple[Path, Path]:
    """Resolve (encoder folder, tokenizer folder) for a plain or diffusers-pipeline layout."""
    if not path.exists():
        raise FileNotFoundError(f"T5 text encoder path not found: {path}")
    enc = path / "text_encoder" if not (path / "config.json").exists() and (path / "text_encoder").is_dir() else path
    if not (enc / "config.json").exists():
        raise FileNotFoundError(f"{path}: no config.json for a T5 encoder")
    if tokenizer_path is not None:
        tok = Path(tokenizer_path)
    else:
        has_tokenizer = lambda d: any((d / f).exists() for f in _TOKENIZER_FILES)  # noqa: E731
        tok = next((d for d in (enc, enc.parent / "tokenizer") if has_tokenizer(d)), None)
        if tok is None:
            raise FileNotFoundError(f"no tokenizer files ({', '.join(_TOKENIZER_FILES)}) in {enc} or "
                                    f"{enc.parent / 'tokenizer'}; pass tokenizer_path")
    if not tok.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {tok}")
    return enc, tok


# --- loading -----------------------------------------------------------------------------------------------------

def load_text_encoder(path: str | Path, *, tokenizer_path: str | Path | None = None, max_length: int | None = None,
                      dtype: torch.dtype | None = None, device: str | torch.device | None = None):
    """A ByteTextEncoder folder (our marker in config.json) or a T5 folder (model_type t5); with `dtype` None, in
    the stored precision unless that is a half type this device runs slowly (then float32)."""
    encoder = _load_text_encoder(Path(path), tokenizer_path, max_length, dtype, device)
    return encoder if dtype is not None else run_fast(encoder, device or "cpu")


def _load_text_encoder(path: Path, tokenizer_path, max_length, dtype, device):
    config = _read_config(path)
    if config is not None and MARKER in config:
        return ByteTextEncoder.load(path, dtype=dtype, device=device)
    if config is None and (path / "text_encoder").is_dir():
        config = _read_config(path / "text_encoder")
    if config is not None and config.get("model_type") == "t5":
        kw = {} if max_length is None else {"max_length": max_length}
        return T5TextEncoder(path, tokenizer_path, dtype=dtype, device=device, **kw)
    if not path.exists():
        raise FileNotFoundError(f"text encoder path not found: {path}")
    raise ValueError(f"{path} is neither a ByteTextEncoder folder nor a T5 encoder folder "
                     f"(config.json with model_type 't5')")


def _read_config(folder: Path) -> dict | None:
    file = folder / "config.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: invalid JSON ({e})") from None
