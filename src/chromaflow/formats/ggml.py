"""ggml block formats in torch: dequantize (on any device, per layer at run time) and quantize (for writing GGUF).

A quantized (rows, cols) weight is stored as `rows` independent rows of `cols / block` blocks, so its raw form is a
uint8 tensor (rows, row_bytes); row ranges of a weight are row ranges of its raw bytes. Block layouts follow the
ggml definitions (spec inference-techniques.md §7.1); tests check every type against the `gguf` package's reference
dequantizer. Legacy types are quantized by the `gguf` package itself; it has no K-quant quantizers, so those are
ours (min/max per sub-block, one least-squares refit, 6/8-bit scales).
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT
from gguf import quants as reference
from torch import Tensor

FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16)
# what chromaflow keeps quantized in memory and dequantizes in torch
SUPPORTED = FLOAT_TYPES + (QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q4_K, QT.Q5_K, QT.Q6_K)
WRITABLE = SUPPORTED


def qtype(name_or_value: str | int | QT) -> QT:
    """A ggml type from its name ("Q4_K", case-insensitive) or number."""
    if isinstance(name_or_value, QT):
        return name_or_value
    try:
        return QT[name_or_value.upper()] if isinstance(name_or_value, str) else QT(int(name_or_value))
    except (KeyError, ValueError):
        raise ValueError(f"unknown ggml quantization type {name_or_value!r}; "
                         f"supported: {', '.join(t.name for t in SUPPORTED)}") from None


def readable(t: QT) -> bool:
    """Ours in torch, or one the package's reference dequantizer handles (checked on one zero block)."""
    if t in SUPPORTED:
        return True
    if t not in GGML_QUANT_SIZES:
        return False
    try:
        reference.dequantize(np.zeros((1, GGML_QUANT_SIZES[t][1]), np.uint8), t)
    except (NotImplementedError, ValueError, KeyError):
        return False
    return True


def block_size(t: QT) -> int:
    return GGML_QUANT_SIZES[t][0]


def row_bytes(t: QT, cols: int) -> int:
    block, size = GGML_QUANT_SIZES[t]
    if cols % block:
        raise ValueError(f"{t.name} needs rows whose length is a multiple of {block}, got {cols}")
    return cols // block * size


# --- dequantization -------------------------------------------------------------------------------------------

def _f16(blocks: Tensor, at: int) -> Tensor:
    """The little-endian float16 at byte `at` of every block, as float32 (nb, 1)."""
    return blocks[:, at:at + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: Tensor) -> Tensor:
    """Bytes (..., n) -> (..., 2n) 4-bit values: low nibbles first, then high nibbles (ggml order in a block)."""
    return torch.cat([qs & 15, qs >> 4], -1)


def _bits(packed: Tensor, n: int) -> Tensor:
    """Little-endian bit i of each block's `packed` bytes (nb, n/8) -> (nb, n) in {0, 1}."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    return ((packed[..., None] >> shifts) & 1).flatten(-2)[..., :n]


def _k_scales(raw: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K / Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins (nb, 8) each."""
    b = raw.long()
    lo_sc, lo_m = b[:, 0:4] & 63, b[:, 4:8] & 63
    hi_sc = (b[:, 8:12] & 15) | ((b[:, 0:4] >> 6) << 4)
    hi_m = (b[:, 8:12] >> 4) | ((b[:, 4:8] >> 6) << 4)
    return torch.cat([lo_sc, hi_sc], 1).float(), torch.cat([lo_m, hi_m], 1).float()


def _q8_0(b):
    return _f16(b, 0) * b[:, 2:].contiguous().view(torch.int8).float()


def _q4_0(b):
    return _f16(b, 0) * (_nibbles(b[:, 2:]).float() - 8)


def _q4_1(b):
    return _f16(b, 0) * _nibbles(b[:, 4:]).float() + _f16(b, 2)


def _q5_0(b):
    return _f16(b, 0) * ((_nibbles(b[:, 6:]) | (_bits(b[:, 2:6], 32) << 4)).float() - 16)


def _q5_1(b):
    return _f16(b, 0) * (_nibbles(b[:, 8:]) | (_bits(b[:, 4:8], 32) << 4)).float() + _f16(b, 2)


def _k_low(qs: Tensor) -> Tensor:
    """Q4_K / Q5_K low bits: 32-byte chunk c holds sub-block 2c (low nibbles) and 2c+1 (high) -> (nb, 8, 32)."""
    chunks = qs.reshape(-1, 4, 1, 32)
    return torch.cat([chunks & 15, chunks >> 4], 2).reshape(-1, 8, 32)


def _q4_k(b):
    sc, m = _k_scales(b[:, 4:16])
    q = _k_low(b[:, 16:144]).float()
    return (_f16(b, 0)[:, :, None] * sc[..., None] * q - _f16(b, 2)[:, :, None] * m[..., None]).flatten(1)


def _q5_k(b):
    sc, m = _k_scales(b[:, 4:16])
    shifts = torch.arange(8, device=b.device, dtype=torch.uint8)[None, :, None]
    high = (b[:, None, 16:48] >> shifts) & 1  # sub-block j takes bit j of qh[l]
    q = (_k_low(b[:, 48:176]) | (high << 4)).float()
    return (_f16(b, 0)[:, :, None] * sc[..., None] * q - _f16(b, 2)[:, :, None] * m[..., None]).flatten(1)


def _q6_k(b):
    ql, qh = b[:, 0:128].reshape(-1, 2, 64), b[:, 128:192].reshape(-1, 2, 32)
    shifts = torch.tensor([0, 2, 4, 6], device=b.device, dtype=torch.uint8)[:, None]
    high = ((qh[:, :, None, :] >> shifts) & 3).reshape(-1, 2, 128)  # bit pair k -> elements 32k..32k+31
    q = (_nibbles(ql) | (high << 4)).reshape(-1, 16, 16).to(torch.int8) - 32
    scales = _f16(b, 208) * b[:, 192:208].contiguous().view(torch.int8).float()  # (nb, 16): one per 16 values
    return (scales[..., None] * q).flatten(1)


_DEQUANT = {QT.Q8_0: _q8_0, QT.Q4_0: _q4_0, QT.Q4_1: _q4_1, QT.Q5_0: _q5_0, QT.Q5_1: _q5_1,
            QT.Q4_K: _q4_k, QT.Q5_K: _q5_k, QT.Q6_K: _q6_k}


def dequantize(raw: Tensor, t: QT, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """Raw ggml data (any shape of uint8 holding whole rows, or a float tensor for F32/F16) -> `shape` in `dtype`."""
    if t in (QT.F32, QT.F16):
        return raw.reshape(shape).to(dtype)
    if t == QT.BF16:
        return raw.contiguous().view(torch.uint8).view(torch.bfloat16).reshape(shape).to(dtype)
    block, size = GGML_QUANT_SIZES[t]
    blocks = raw.contiguous().view(torch.uint8).reshape(-1, size)
    if t in _DEQUANT:
        values = _DEQUANT[t](blocks)
    elif raw.device.type == "cpu":  # other ggml types: the package's numpy reference (slow, CPU only)
        values = torch.from_numpy(reference.dequantize(blocks.numpy(), t))
    else:
        raise ValueError(f"no torch dequantizer for {t.name} on {raw.device}; load the model on the CPU")
    return values.reshape(shape).to(dtype)


# --- quantization ---------------------------------------------------------------------------------------------

def _round_clamp(x: Tensor, hi: int, lo: int = 0) -> Tensor:
    return torch.round(x).clamp_(lo, hi)


def _safe_div(a: Tensor, b: Tensor) -> Tensor:
    return torch.where(b == 0, torch.zeros_like(a), a / torch.where(b == 0, torch.ones_like(b), b))


def _fit_min_scale(x: Tensor, levels: int) -> tuple[Tensor, Tensor]:
    """Per sub-block (..., n): y = scale * q + offset with q in [0, levels], offset <= 0 (the K-quant form).
    Start from min/max, then one least-squares refit of (scale, offset) for the chosen q."""
    offset = x.amin(-1).clamp(max=0)
    scale = (x.amax(-1) - offset) / levels
    q = _round_clamp(_safe_div(x - offset[..., None], scale[..., None]), levels)
    n = x.shape[-1]
    sq, sx, sqq, sqx = q.sum(-1), x.sum(-1), (q * q).sum(-1), (q * x).sum(-1)
    det = n * sqq - sq * sq
    fit_scale = _safe_div(n * sqx - sq * sx, det)
    fit_offset = _safe_div(sqq * sx - sq * sqx, det)
    no_offset = _safe_div(sqx, sqq)  # refit with offset pinned to 0 when the free fit wants it positive
    fit_scale = torch.where(fit_offset > 0, no_offset, fit_scale)
    fit_offset = fit_offset.clamp(max=0)
    better = (det > 0) & (fit_scale > 0)
    return torch.where(better, fit_scale, scale), torch.where(better, fit_offset, offset)


def _half(x: Tensor) -> Tensor:
    return x.to(torch.float16).float()


def _f16_bytes(x: Tensor) -> Tensor:
    return x.to(torch.float16).reshape(-1, 1).view(torch.uint8)


def _quantize_k(x: Tensor, levels: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Q4_K / Q5_K: (nb, 256) -> d, dmin (nb,), sc, m (nb, 8) 6-bit, q (nb, 8, 32)."""
    xs = x.reshape(-1, 8, 32)
    scale, offset = _fit_min_scale(xs, levels)
    d, dmin = _half(scale.amax(-1) / 63), _half((-offset).amax(-1) / 63)
    sc = _round_clamp(_safe_div(scale, d[:, None]), 63)
    m = _round_clamp(_safe_div(-offset, dmin[:, None]), 63)
    eff_scale, eff_min = d[:, None] * sc, dmin[:, None] * m
    q = _round_clamp(_safe_div(xs + eff_min[..., None], eff_scale[..., None]), levels)
    return d, dmin, sc.to(torch.uint8), m.to(torch.uint8), q.to(torch.uint8)


def _pack_k_scales(sc: Tensor, m: Tensor) -> Tensor:
    """Inverse of `_k_scales`: eight 6-bit scales and mins -> 12 bytes."""
    return torch.cat([(sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6), (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6),
                      (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)], 1)


def _pack_k_low(q: Tensor) -> Tensor:
    """(nb, 8, 32) 4-bit values -> 128 bytes: chunk c = sub-block 2c | sub-block 2c+1 << 4."""
    pairs = (q & 15).reshape(-1, 4, 2, 32)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)


def _quantize_q4_k(x):
    d, dmin, sc, m, q = _quantize_k(x, 15)
    return torch.cat([_f16_bytes(d), _f16_bytes(dmin), _pack_k_scales(sc, m), _pack_k_low(q)], 1)


def _quantize_q5_k(x):
    d, dmin, sc, m, q = _quantize_k(x, 31)
    weights = (1 << torch.arange(8, dtype=torch.int32))[None, :, None]
    qh = (((q >> 4) & 1).int() * weights).sum(1).to(torch.uint8)  # qh[l] bit j = high bit of sub-block j
    return torch.cat([_f16_bytes(d), _f16_bytes(dmin), _pack_k_scales(sc, m), qh, _pack_k_low(q)], 1)


def _quantize_q6_k(x):
    xs = x.reshape(-1, 16, 16)
    extreme = xs.gather(-1, xs.abs().argmax(-1, keepdim=True))[..., 0]
    scale = extreme / -32  # the extreme value maps to q - 32 = -32
    d = _half(scale.abs().amax(-1) / 127)
    sc = _round_clamp(_safe_div(scale, d[:, None]), 127, -128)
    q = _round_clamp(_safe_div(xs, (d[:, None] * sc)[..., None]) + 32, 63).to(torch.uint8).reshape(-1, 2, 128)
    ql = (q[:, :, :64] & 15) | ((q[:, :, 64:] & 15) << 4)
    pairs = (q >> 4).reshape(-1, 2, 4, 32)
    qh = pairs[:, :, 0] | (pairs[:, :, 1] << 2) | (pairs[:, :, 2] << 4) | (pairs[:, :, 3] << 6)
    return torch.cat([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.to(torch.int8).view(torch.uint8),
                      _f16_bytes(d)], 1)


_QUANT_K = {QT.Q4_K: _quantize_q4_k, QT.Q5_K: _quantize_q5_k, QT.Q6_K: _quantize_q6_k}


def quantize(weight: Tensor, t: QT) -> Tensor:
    """A (rows, cols) (or 1-D) float tensor -> raw ggml data: float32/float16 for F32/F16, else uint8
    (rows, row_bytes). On the CPU; the result is owned memory."""
    x = weight.detach().to("cpu", torch.float32)
    if t == QT.F32:
        return x.contiguous()
    if t == QT.F16:
        return x.to(torch.float16)
    shape = x.shape
    rb = row_bytes(t, shape[-1])
    if t in _QUANT_K:
        raw = _QUANT_K[t](x.reshape(-1, block_size(t)))
    else:  # BF16 and the legacy block types: the package's own quantizer
        raw = torch.from_numpy(np.ascontiguousarray(reference.quantize(x.reshape(-1, shape[-1]).numpy(), t)))
    return raw.reshape(*shape[:-1], rb)


def nbytes(t: QT, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of `shape` takes in type `t`."""
    block, size = GGML_QUANT_SIZES[t]
    n = int(np.prod(shape))
    return n // block * size
