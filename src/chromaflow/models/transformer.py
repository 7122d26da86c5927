"""The Flux / Chroma MMDiT: one implementation, two ways of producing the modulation vectors.

Module and parameter names follow the original single-file layout (`double_blocks.N.img_attn.qkv`, ...), so a
state dict of this model *is* an original-layout checkpoint. Flux computes each block's modulation from a
conditioning vector with its own Linear; Chroma replaces all of those with one "approximator" that emits
every modulation vector at once (spec chroma-architecture.md §1-2).

Tensors in `forward` live in packed token space: img (B, L_img, in_channels), txt (B, L_txt, context_in_dim).
For grids beyond the trained size, `forward` takes two per-call options, both off by default (the reference
model): `RopeScaling` (position interpolation or NTK-aware RoPE) and `WindowedAttention` (shifted windows over
the image tokens, text global).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class MMDiTParams:
    variant: str = "chroma"  # "chroma" (approximator) or "flux" (per-block modulation)
    in_channels: int = 64  # 16 latent channels x 2x2 patch
    out_channels: int = 64
    context_in_dim: int = 4096  # text encoder width (T5-XXL)
    hidden_size: int = 3072
    num_heads: int = 24
    depth: int = 19  # double-stream blocks
    depth_single_blocks: int = 38
    mlp_ratio: float = 4.0
    axes_dim: tuple[int, ...] = (16, 56, 56)  # RoPE dims per id axis; sums to head_dim
    theta: int = 10_000
    # None: one position unit per token (Flux, Chroma). N: image positions scaled so that every image spans N units
    # per side (by area) whatever its resolution, so layout learned at one size carries to others (PixArt scales
    # positions with resolution too); the built-in model's 128 px training then shapes its 256 px layout
    position_grid: int | None = None
    qkv_bias: bool = True
    guidance_embed: bool = False  # flux-dev only: embeds distilled guidance
    vec_in_dim: int = 768  # flux only: CLIP pooled vector
    approximator_in_dim: int = 64  # chroma only
    approximator_depth: int = 5
    approximator_hidden: int = 5120

    def __post_init__(self):
        if self.variant not in ("chroma", "flux"):
            raise ValueError(f"variant must be 'chroma' or 'flux', got {self.variant!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"axes_dim {tuple(self.axes_dim)} must sum to head_dim {self.head_dim}")
        object.__setattr__(self, "axes_dim", tuple(self.axes_dim))
        if self.position_grid is not None and not (isinstance(self.position_grid, int) and self.position_grid > 0):
            raise ValueError(f"position_grid must be a positive number of units per side or None, "
                             f"got {self.position_grid!r}")
        if self.variant == "chroma":  # Chroma always feeds a guidance slot to its approximator (as 0)
            object.__setattr__(self, "guidance_embed", True)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def mod_index_length(self) -> int:
        """Chroma: rows of approximator output = 3 per single block, 2x6 per double block, 2 for the final layer."""
        return 3 * self.depth_single_blocks + 12 * self.depth + 2

    def to_dict(self) -> dict:
        d = asdict(self)
        d["axes_dim"] = list(self.axes_dim)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MMDiTParams":
        known = {f.name for f in fields(cls)}
        return cls(**{k: (tuple(v) if k == "axes_dim" else v) for k, v in d.items() if k in known})


_FULL = dict(in_channels=64, out_channels=64, context_in_dim=4096, hidden_size=3072, num_heads=24, depth=19,
             depth_single_blocks=38, axes_dim=(16, 56, 56))

PRESETS: dict[str, MMDiTParams] = {
    "chroma": MMDiTParams(variant="chroma", **_FULL),
    "flux-dev": MMDiTParams(variant="flux", guidance_embed=True, **_FULL),
    "flux-schnell": MMDiTParams(variant="flux", guidance_embed=False, **_FULL),
    # the built-in model (trained here on the procedural shapes world)
    "default": MMDiTParams(variant="chroma", context_in_dim=256, hidden_size=256, num_heads=4, depth=3,
                           depth_single_blocks=5, axes_dim=(8, 28, 28), approximator_hidden=256,
                           approximator_depth=2),
    # small configs for tests: every code path, seconds on a CPU
    "tiny": MMDiTParams(variant="chroma", context_in_dim=32, hidden_size=64, num_heads=2, depth=2,
                        depth_single_blocks=2, axes_dim=(4, 14, 14), approximator_hidden=96, approximator_depth=2),
    "tiny-flux": MMDiTParams(variant="flux", guidance_embed=True, context_in_dim=32, hidden_size=64, num_heads=2,
                             depth=2, depth_single_blocks=2, axes_dim=(4, 14, 14), vec_in_dim=24),
}


def preset(name: str, **overrides) -> MMDiTParams:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    return replace(PRESETS[name], **overrides)


# --- pure functions -------------------------------------------------------------------------------------------

def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000, time_factor: float = 1000.0) -> Tensor:
    """Sinusoid of 1000*t with `dim/2` frequencies, cos block first (Flux convention). Returns float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (time_factor * t.float())[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope(pos: Tensor, dim: int, theta: float) -> Tensor:
    """One id axis: (B, L) -> (2, B, L, dim), per channel the cosine and the signed sine of its pair's angle (see
    `apply_rope`); pair j turns by pos * theta^(-2j/dim). Computed in float64 like the reference."""
    omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim)
    angle = (pos.double()[..., None] * omega).repeat_interleave(2, -1)
    sign = torch.tensor([-1.0, 1.0], dtype=torch.float64, device=pos.device).repeat(dim // 2)
    return torch.stack([torch.cos(angle), torch.sin(angle) * sign]).float()


ROPE_SCALINGS = ("interpolate", "ntk")


@dataclass(frozen=True)
class RopeScaling:
    """Positions for image grids larger than the model saw in training, on the spatial id axes (1 and 2).

    "interpolate" (position interpolation): positions are divided by `factor`, so a grid `factor` times the native
    side spans the trained range of positions (neighbours then sit closer than in training).
    "ntk" (NTK-aware scaling): theta becomes theta * factor^(d / (d - 2)) for an axis of d dims: the highest
    frequencies (fine, local detail) stay, the lowest are stretched by `factor` to cover the larger grid.
    Text ids are all zero and unaffected either way. factor 1 is the native embedding."""
    method: str
    factor: float

    def __post_init__(self):
        if self.method not in ROPE_SCALINGS:
            raise ValueError(f"unknown rope scaling {self.method!r}; valid: {', '.join(ROPE_SCALINGS)}")
        if not self.factor >= 1:
            raise ValueError(f"rope scaling factor must be >= 1 (the grid over the native size), got {self.factor}")


def position_embedding(ids: Tensor, axes_dim: tuple[int, ...], theta: int,
                       scaling: RopeScaling | None = None) -> Tensor:
    """ids (B, L, n_axes) -> (2, B, 1, L, head_dim): cosines and signed sines per channel (see `rope`), the per-axis
    tables concatenated on channels."""
    tables = []
    for axis, dim in enumerate(axes_dim):
        pos, base = ids[..., axis], theta
        if scaling is not None and axis > 0:
            if scaling.method == "interpolate":
                pos = pos / scaling.factor
            else:
                base = theta * scaling.factor ** (dim / (dim - 2))
        tables.append(rope(pos, dim, base))
    return torch.cat(tables, dim=-1).unsqueeze(2)


class _SwapPairs(torch.autograd.Function):
    """(x0, x1, x2, x3, ...) -> (x1, x0, x3, x2, ...) on the last dim of a contiguous float32 tensor, exactly: each
    pair is read as one 64-bit word whose halves are rotated. Compiled, that is a vector shuffle where a flip
    compiles to a gather: RoPE runs ~3.5x faster (eager, the flip is as fast). Its own gradient: a permutation
    that is its own inverse."""

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        word = x.view(torch.int64)
        return ((word << 32) | ((word >> 32) & 0xFFFFFFFF)).view(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return _SwapPairs.apply(grad.contiguous())


def apply_rope(x: Tensor, pe: Tensor) -> Tensor:
    """Rotate adjacent pairs (x[2j], x[2j+1]) of q or k (B, H, L, D) in float32:
    (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin), i.e. x * cos + swapped pairs * signed sin."""
    xf = x.to(torch.float32, memory_format=torch.contiguous_format)
    swapped = _SwapPairs.apply(xf) if torch.compiler.is_compiling() else xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return torch.addcmul(xf * pe[0], swapped, pe[1]).type_as(x)


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor, key_mask: Tensor | None,
              window: WindowedAttention | None = None) -> Tensor:
    """Joint attention over [txt; img]. `key_mask` (B, L) bool hides keys; `window` restricts image queries to
    their window (see WindowedAttention). Returns (B, L, H*D)."""
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    if window is None:
        x = _sdpa(q, k, v, attn_mask=mask)
    else:
        n_txt = q.shape[2] - window.grid[0] * window.grid[1]
        text = _sdpa(q[:, :, :n_txt], k, v, attn_mask=mask)  # text queries stay global
        x = torch.cat([text, _window_attention(q, k, v, key_mask, window, n_txt)], 2)
    return x.transpose(1, 2).flatten(2)


# PyTorch's CPU flash-attention kernel is slow to differentiate at short sequences; its math backend (which upcasts
# bf16 internally: the same error against float64) runs forward + backward 1.4-4x faster up to ~150 keys (4 heads of
# 64: 2.2x at 48, 1.7x at 80, 1.4x at 144; 0.9x from ~200 on; an AVX-512 CPU, bf16). The built-in model trains at
# 80 tokens (128 px) most of its steps. Inference keeps the flash kernel, faster there at every length.
SHORT_TRAINING_KEYS = 160


def _sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None) -> Tensor:
    """F.scaled_dot_product_attention, on the math backend for short CPU sequences that need gradients (above)."""
    if q.requires_grad and q.device.type == "cpu" and k.shape[2] <= SHORT_TRAINING_KEYS:
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


@dataclass(frozen=True)
class WindowedAttention:
    """Shifted-window self-attention over the image tokens of a rows x cols grid (row-major, as `image_ids`).

    Image queries attend to every text key and to the image keys of their own window; text queries stay global.
    So every image token still reads the prompt, and attention cost grows linearly with the number of image tokens
    (windows x window area) instead of quadratically. Blocks are numbered double blocks first, then single blocks,
    from 0; the first `blocks` of them use windows, and odd ones shift the window grid by half a window so that
    information crosses window borders from block to block (Swin). Edge windows of a grid the window does not
    divide are partial: their missing keys are hidden. A window larger than the grid is clamped to it."""
    grid: tuple[int, int]  # image tokens: rows, cols
    size: tuple[int, int]  # window, in tokens
    blocks: int = 1 << 30
    shift: tuple[int, int] = (0, 0)  # offset of the window grid, set per block by `at`

    def __post_init__(self):
        if min(*self.grid, *self.size) < 1:
            raise ValueError(f"window {self.size} and grid {self.grid} must be positive")
        object.__setattr__(self, "size", (min(self.size[0], self.grid[0]), min(self.size[1], self.grid[1])))

    def at(self, index: int) -> WindowedAttention | None:
        """The windows block number `index` uses, or None for full attention."""
        if index >= self.blocks:
            return None
        half = (self.size[0] // 2, self.size[1] // 2) if index % 2 else (0, 0)
        return replace(self, shift=half)

    @property
    def padded(self) -> tuple[int, int]:
        """Rows and cols of the grid once shifted and padded to whole windows."""
        return tuple(-(-(n + s) // w) * w for n, s, w in zip(self.grid, self.shift, self.size))


def _to_windows(x: Tensor, w: WindowedAttention) -> Tensor:
    """Image tokens (B, H, rows*cols, D) -> (B * n_windows, H, window area, D), batch-major, zero padded."""
    b, heads, _, d = x.shape
    (rows, cols), (wr, wc), (sr, sc), (pr, pc) = w.grid, w.size, w.shift, w.padded
    x = F.pad(x.view(b, heads, rows, cols, d), (0, 0, sc, pc - cols - sc, sr, pr - rows - sr))
    x = x.view(b, heads, pr // wr, wr, pc // wc, wc, d).permute(0, 2, 4, 1, 3, 5, 6)
    return x.reshape(-1, heads, wr * wc, d)


def _from_windows(x: Tensor, w: WindowedAttention, batch: int) -> Tensor:
    """Inverse of _to_windows: (B * n_windows, H, window area, D) -> (B, H, rows*cols, D), padding dropped."""
    (rows, cols), (wr, wc), (sr, sc), (pr, pc) = w.grid, w.size, w.shift, w.padded
    heads, d = x.shape[1], x.shape[-1]
    x = x.view(batch, pr // wr, pc // wc, heads, wr, wc, d).permute(0, 3, 1, 4, 2, 5, 6)
    x = x.reshape(batch, heads, pr, pc, d)
    return x[:, :, sr:sr + rows, sc:sc + cols].reshape(batch, heads, rows * cols, d)


def _window_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, w: WindowedAttention,
                      n_txt: int) -> Tensor:
    """Image queries over [all text keys; their window's image keys] -> (B, H, rows*cols, D)."""
    b = q.shape[0]
    valid = _to_windows(q.new_ones(1, 1, w.grid[0] * w.grid[1], 1), w)[:, 0, :, 0] > 0  # (n_windows, area)
    n_windows = valid.shape[0]
    # each window's keys: every text token, then the window's image tokens
    keys, values = (torch.cat([x[:, :, :n_txt].repeat_interleave(n_windows, 0), _to_windows(x[:, :, n_txt:], w)], 2)
                    for x in (k, v))
    mask = None
    if key_mask is not None or not bool(valid.all()):
        txt_mask = (key_mask[:, :n_txt] if key_mask is not None else valid.new_ones(b, n_txt)).bool()
        mask = torch.cat([txt_mask.repeat_interleave(n_windows, 0), valid.repeat(b, 1)], 1)[:, None, None, :]
    out = _sdpa(_to_windows(q[:, :, n_txt:], w), keys, values, attn_mask=mask)
    return _from_windows(out, w, b)


def split_heads(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, L, 3*H*D) -> three (B, H, L, D)."""
    b, length, _ = qkv.shape
    q, k, v = qkv.view(b, length, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    return q, k, v


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None])


# --- layers ---------------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """RMSNorm in float32 with a learnable `scale` (original-layout name)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.scale.float()).to(x.dtype)


class QKNorm(nn.Module):
    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v.dtype), self.key_norm(k).to(v.dtype)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class Modulation(nn.Module):
    """Flux: n modulation vectors for one block from the conditioning vector."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.lin = nn.Linear(dim, n * dim)
        self.n = n

    def forward(self, vec: Tensor) -> Tensor:
        return self.lin(F.silu(vec)).unflatten(-1, (self.n, -1))  # (B, n, H)


class Approximator(nn.Module):
    """Chroma's `distilled_guidance_layer`: (B, rows, 64) -> (B, rows, hidden) modulation vectors."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, depth: int):
        super().__init__()
        self.in_proj = nn.Linear(in_dim, hidden)
        self.layers = nn.ModuleList(MLPEmbedder(hidden, hidden) for _ in range(depth))
        self.norms = nn.ModuleList(RMSNorm(hidden) for _ in range(depth))
        self.out_proj = nn.Linear(hidden, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.in_proj(x)
        for layer, norm in zip(self.layers, self.norms):
            x = x + layer(norm(x))
        return self.out_proj(x)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)


def _mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


def _layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class DoubleStreamBlock(nn.Module):
    """Separate weights for image and text, one joint attention over [txt; img]."""

    def __init__(self, p: MMDiTParams, index: int = 0):
        super().__init__()
        h = p.hidden_size
        self.num_heads, self.index = p.num_heads, index  # index: the block's number, for windowed attention
        for s in ("img", "txt"):
            if p.variant == "flux":
                setattr(self, f"{s}_mod", Modulation(h, 6))
            setattr(self, f"{s}_norm1", _layer_norm(h))
            setattr(self, f"{s}_attn", SelfAttention(h, p.num_heads, p.qkv_bias))
            setattr(self, f"{s}_norm2", _layer_norm(h))
            setattr(self, f"{s}_mlp", _mlp(h, p.mlp_hidden))

    def _qkv(self, stream: str, x: Tensor, mod: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        attn = getattr(self, f"{stream}_attn")
        q, k, v = split_heads(attn.qkv(modulate(getattr(self, f"{stream}_norm1")(x), mod[:, 0], mod[:, 1])),
                              self.num_heads)
        q, k = attn.norm(q, k, v)
        return q, k, v

    def _finish(self, stream: str, x: Tensor, attn_out: Tensor, mod: Tensor) -> Tensor:
        x = x + mod[:, 2, None] * getattr(self, f"{stream}_attn").proj(attn_out)
        mlp_in = modulate(getattr(self, f"{stream}_norm2")(x), mod[:, 3], mod[:, 4])
        return x + mod[:, 5, None] * getattr(self, f"{stream}_mlp")(mlp_in)

    def forward(self, img: Tensor, txt: Tensor, img_mod: Tensor, txt_mod: Tensor, pe: Tensor,
                key_mask: Tensor | None, window: WindowedAttention | None = None) -> tuple[Tensor, Tensor]:
        iq, ik, iv = self._qkv("img", img, img_mod)
        tq, tk, tv = self._qkv("txt", txt, txt_mod)
        out = attention(torch.cat([tq, iq], 2), torch.cat([tk, ik], 2), torch.cat([tv, iv], 2), pe, key_mask,
                        window and window.at(self.index))
        n_txt = txt.shape[1]
        return self._finish("img", img, out[:, n_txt:], img_mod), self._finish("txt", txt, out[:, :n_txt], txt_mod)


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP over the joint sequence; linear1 = [q, k, v, mlp_in], linear2 = [attn, mlp] -> out."""

    def __init__(self, p: MMDiTParams, index: int = 0):
        super().__init__()
        h = p.hidden_size
        self.num_heads, self.hidden_size, self.mlp_hidden, self.index = p.num_heads, h, p.mlp_hidden, index
        self.linear1 = nn.Linear(h, 3 * h + p.mlp_hidden)
        self.linear2 = nn.Linear(h + p.mlp_hidden, h)
        self.norm = QKNorm(p.head_dim)
        self.pre_norm = _layer_norm(h)
        if p.variant == "flux":
            self.modulation = Modulation(h, 3)

    def forward(self, x: Tensor, mod: Tensor, pe: Tensor, key_mask: Tensor | None,
                window: WindowedAttention | None = None) -> Tensor:
        qkv, mlp = self.linear1(modulate(self.pre_norm(x), mod[:, 0], mod[:, 1])).split(
            [3 * self.hidden_size, self.mlp_hidden], dim=-1)
        q, k, v = split_heads(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        attn = attention(q, k, v, pe, key_mask, window and window.at(self.index))
        out = self.linear2(torch.cat([attn, F.gelu(mlp, approximate="tanh")], 2))
        return x + mod[:, 2, None] * out


class LastLayer(nn.Module):
    def __init__(self, p: MMDiTParams):
        super().__init__()
        self.norm_final = _layer_norm(p.hidden_size)
        self.linear = nn.Linear(p.hidden_size, p.out_channels)
        if p.variant == "flux":
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(p.hidden_size, 2 * p.hidden_size))

    def forward(self, x: Tensor, mod: Tensor) -> Tensor:
        return self.linear(modulate(self.norm_final(x), mod[:, 0], mod[:, 1]))


# --- the model ------------------------------------------------------------------------------------------------

@dataclass
class Modulations:
    """Per-block modulation vectors, each (B, n, hidden): double = [(img (6), txt (6))], single = [(3)], final (2)."""
    double: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    single: list[Tensor] = field(default_factory=list)
    final: Tensor | None = None


class MMDiT(nn.Module):
    def __init__(self, params: MMDiTParams):
        super().__init__()
        p = self.params = params
        h = p.hidden_size
        self.gradient_checkpointing = False
        self.img_in = nn.Linear(p.in_channels, h)
        self.txt_in = nn.Linear(p.context_in_dim, h)
        if p.variant == "flux":
            self.time_in = MLPEmbedder(256, h)
            self.vector_in = MLPEmbedder(p.vec_in_dim, h)
            if p.guidance_embed:
                self.guidance_in = MLPEmbedder(256, h)
        else:
            self.distilled_guidance_layer = Approximator(p.approximator_in_dim, p.approximator_hidden, h,
                                                         p.approximator_depth)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(p, i) for i in range(p.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(p, p.depth + i) for i in range(p.depth_single_blocks))
        self.final_layer = LastLayer(p)

    # modulation ------------------------------------------------------------------------------------------------
    def modulations(self, timesteps: Tensor, guidance: Tensor | None = None, y: Tensor | None = None) -> Modulations:
        p, dtype = self.params, self.img_in.weight.dtype
        if guidance is None:
            guidance = torch.zeros_like(timesteps)  # Chroma trains with a static guidance of 0
        if p.variant == "chroma":
            quarter = p.approximator_in_dim // 4
            b, rows = timesteps.shape[0], p.mod_index_length
            tg = torch.cat([timestep_embedding(timesteps, quarter), timestep_embedding(guidance, quarter)], -1)
            # sinusoid of each row's index; recomputed (it is tiny) so meta-device construction stays valid
            index = timestep_embedding(torch.arange(rows, device=timesteps.device), p.approximator_in_dim // 2)
            x = torch.cat([tg[:, None].expand(b, rows, -1), index[None].expand(b, -1, -1)], -1)
            m = self.distilled_guidance_layer(x.to(dtype))
            n1, n2 = 3 * p.depth_single_blocks, 3 * p.depth_single_blocks + 6 * p.depth
            return Modulations(
                double=[(m[:, n1 + 6 * i:n1 + 6 * i + 6], m[:, n2 + 6 * i:n2 + 6 * i + 6]) for i in range(p.depth)],
                single=[m[:, 3 * i:3 * i + 3] for i in range(p.depth_single_blocks)],
                final=m[:, -2:])
        vec = self.time_in(timestep_embedding(timesteps, 256).to(dtype))
        if p.guidance_embed:
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(dtype))
        if y is None:
            raise ValueError("the flux variant needs the pooled CLIP vector `y`")
        vec = vec + self.vector_in(y.to(dtype))
        final = self.final_layer.adaLN_modulation(vec).unflatten(-1, (2, -1))
        return Modulations(double=[(blk.img_mod(vec), blk.txt_mod(vec)) for blk in self.double_blocks],
                           single=[blk.modulation(vec) for blk in self.single_blocks], final=final)

    # forward ---------------------------------------------------------------------------------------------------
    def forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor,
                txt_mask: Tensor | None = None, guidance: Tensor | None = None, y: Tensor | None = None,
                mods: Modulations | None = None, drop_masked: bool = True, cache=None,
                rope_scaling: RopeScaling | None = None, window: WindowedAttention | None = None) -> Tensor:
        """Predict the velocity for packed latents `img`.

        txt_mask (B, L_txt) bool marks visible text tokens (Chroma: real + EOS + one pad); image tokens are always
        visible. Hidden tokens are never attended to, so they cannot influence the image: with `drop_masked` they
        are removed from the sequence up front (exact, and far cheaper than attending over 512 padded slots).
        `cache` (models.step_cache.StepCache) may skip most blocks on steps whose input barely changed.
        For grids beyond the trained size: `rope_scaling` changes the image positions' embedding, `window` makes
        image tokens attend within windows (both None: the reference model).
        """
        if mods is None:
            mods = self.modulations(timesteps, guidance, y)
        if txt_mask is not None and drop_masked:
            txt, txt_ids, txt_mask = drop_hidden_tokens(txt, txt_ids, txt_mask)
        dtype = self.img_in.weight.dtype
        if self.params.position_grid:  # the image spans position_grid units per side at any size
            scale = self.params.position_grid / math.sqrt(img.shape[1])
            img_ids = img_ids * img_ids.new_tensor([1.0, scale, scale])
        img, txt = self.img_in(img.to(dtype)), self.txt_in(txt.to(dtype))
        pe = position_embedding(torch.cat([txt_ids, img_ids], 1), self.params.axes_dim, self.params.theta,
                                rope_scaling)
        key_mask = None
        if txt_mask is not None:
            key_mask = torch.cat([txt_mask.bool(), txt_mask.new_ones(img.shape[:2], dtype=torch.bool)], 1)

        if window is not None and window.grid[0] * window.grid[1] != img.shape[1]:
            raise ValueError(f"window grid {window.grid} does not match {img.shape[1]} image tokens")
        if cache is None:
            img = self.blocks(img, txt, mods, pe, key_mask, window=window)
        else:
            img = cache(self, img, txt, mods, pe, key_mask, window=window)
        return self.final_layer(img, mods.final)

    def blocks(self, img: Tensor, txt: Tensor, mods: Modulations, pe: Tensor, key_mask: Tensor | None,
               start: int = 0, window: WindowedAttention | None = None) -> Tensor:
        """Double blocks from number `start` on, then every single block; returns the image stream."""
        run = self._checkpointed if self.gradient_checkpointing and self.training else (lambda f, *a: f(*a))
        for block, (img_mod, txt_mod) in list(zip(self.double_blocks, mods.double))[start:]:
            img, txt = run(block, img, txt, img_mod, txt_mod, pe, key_mask, window)
        x = torch.cat([txt, img], 1)
        for block, mod in zip(self.single_blocks, mods.single):
            x = run(block, x, mod, pe, key_mask, window)
        return x[:, txt.shape[1]:]

    @staticmethod
    def _checkpointed(fn, *args):
        return checkpoint(fn, *args, use_reentrant=False)

    def compile_blocks(self, mode: str | None = None) -> "MMDiT":
        """torch.compile (inductor; C++ on a CPU) every block in place, with dynamic shapes so a new size or prompt
        length does not recompile. Blocks, not the whole forward, because the step cache and the windowed-attention
        path call the blocks directly. The first call pays the compile (10-30 s on a CPU). (Inductor's `freezing`,
        weights as constants, measured no faster here: the matmuls already run near the peak.)"""
        for block in [*self.double_blocks, *self.single_blocks]:
            block.compile(dynamic=True, mode=mode)
        return self


def image_ids(batch: int, rows: int, cols: int, device=None) -> Tensor:
    """(batch, rows*cols, 3) ids (0, row, col) for the packed latent grid, row-major."""
    r, c = torch.meshgrid(torch.arange(rows, device=device), torch.arange(cols, device=device), indexing="ij")
    ids = torch.stack([torch.zeros_like(r), r, c], -1).reshape(1, rows * cols, 3).float()
    return ids.expand(batch, -1, -1)


def drop_hidden_tokens(txt: Tensor, txt_ids: Tensor, txt_mask: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """Keep only visible text tokens, left-aligned and padded to the longest row; the returned mask is None when
    every row keeps the same count (no masking needed at all). Text ids are all zero, so order is free."""
    mask = txt_mask.bool()
    counts = mask.sum(1)
    keep = int(counts.max())
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :keep]
    txt = txt.gather(1, order[..., None].expand(-1, -1, txt.shape[-1]))
    txt_ids = txt_ids.expand(txt.shape[0], -1, -1).gather(1, order[..., None].expand(-1, -1, txt_ids.shape[-1]))
    if bool((counts == keep).all()):
        return txt, txt_ids, None
    return txt, txt_ids, torch.arange(keep, device=mask.device)[None] < counts[:, None]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def init_adaln_zero(model: MMDiT) -> MMDiT:
    """DiT's adaLN-Zero start for training from scratch: Xavier-uniform matrices, zero biases, and zero
    modulation and output layers, so every block begins as the identity (gates 0) and the velocity as 0; the gates
    then open as they learn. PyTorch's default init instead starts each block as a random perturbation."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    zeroed = [model.final_layer.linear]
    if model.params.variant == "chroma":
        zeroed.append(model.distilled_guidance_layer.out_proj)
    else:
        zeroed += [m.lin for m in model.modules() if isinstance(m, Modulation)]
        zeroed.append(model.final_layer.adaLN_modulation[-1])
    for layer in zeroed:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    return model


def build(params: MMDiTParams | str, device: str | torch.device | None = None,
          dtype: torch.dtype | None = None) -> MMDiT:
    """Instantiate a model; `device="meta"` builds the full-size presets without allocating memory."""
    if isinstance(params, str):
        params = preset(params)
    with torch.device(device or "cpu"):
        model = MMDiT(params)
    return model.to(dtype) if dtype is not None else model
