"""Quantized linears: weights stay compact in memory and are expanded per layer, per forward.

Formats: ggml blocks from GGUF files (F16, BF16, Q8_0 ... Q6_K; formats.ggml), int8 weight-only with a scale per
output row, fp8 e4m3 with a per-tensor scale (ComfyUI's `scale_weight`), and NF4 (bitsandbytes, block 64,
double-quantized absmax). A model is quantized by swapping its `nn.Linear` modules for these from the outside; the
transformer code does not change. `state_dict()` of a quantized layer yields the expanded weight, so saving or
converting a quantized model writes ordinary tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..formats import ggml
from ..formats.checkpoint import Packed

# Layers kept at higher precision, as ComfyUI-GGUF's Flux / Chroma quantization does: the input / output
# projections and the timestep / guidance embedders are tiny but sensitive (original-layout names).
KEEP_F32 = ("img_in.", "time_in.in_layer.", "vector_in.in_layer.", "guidance_in.in_layer.", "final_layer.linear.",
            "distilled_guidance_layer.in_proj.")
KEEP_F16 = ("txt_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.", "distilled_guidance_layer.")
FORMATS = ("int8", "fp8", "nf4")  # plus every ggml type name, e.g. "Q4_K" (or "gguf:Q4_K")
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def keep_precision(name: str) -> str | None:
    """"F32" / "F16" for layers that stay unquantized (and at which precision), else None."""
    bare = name.removeprefix("model.diffusion_model.")
    if bare.startswith(KEEP_F32):
        return "F32"
    if bare.startswith(KEEP_F16):
        return "F16"
    return None


def parse_format(fmt: str) -> str | ggml.QT:
    """"int8" | "fp8" | "nf4" | a ggml type (from "Q4_K" or "gguf:Q4_K")."""
    low = fmt.lower()
    if low in FORMATS:
        return low
    return ggml.qtype(low.removeprefix("gguf:"))


def quantizable(name: str, shape: tuple[int, ...], fmt: str | ggml.QT) -> bool:
    """Whether the weight `name` (a 2-D Linear weight) is stored quantized in format `fmt`."""
    fmt = parse_format(fmt) if isinstance(fmt, str) else fmt
    if len(shape) != 2 or keep_precision(name) is not None:
        return False
    if isinstance(fmt, ggml.QT):
        return shape[1] % ggml.block_size(fmt) == 0
    return fmt != "nf4" or (shape[0] * shape[1]) % 64 == 0


# --- packing --------------------------------------------------------------------------------------------------

def _bnb():
    try:
        import bitsandbytes.functional as bnb
    except ImportError:
        raise ValueError("NF4 weights need bitsandbytes: pip install 'chromaflow[bnb]'") from None
    return bnb


def pack_weight(weight: Tensor, fmt: str | ggml.QT) -> Packed:
    """Quantize one (out, in) weight into format `fmt` (on the CPU)."""
    fmt = parse_format(fmt) if isinstance(fmt, str) else fmt
    w = weight.detach().to("cpu", torch.float32)
    shape = tuple(w.shape)
    if isinstance(fmt, ggml.QT):
        return Packed("ggml", shape, {"raw": ggml.quantize(w, fmt)}, {"type": fmt})
    if fmt == "int8":
        scale = w.abs().amax(1).clamp(min=1e-12) / 127
        q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        return Packed("scaled", shape, {"weight": q, "scale": scale})
    if fmt == "fp8":
        scale = (w.abs().amax().clamp(min=1e-12) / FP8_MAX).reshape(1)
        return Packed("scaled", shape, {"weight": (w / scale).to(torch.float8_e4m3fn), "scale": scale})
    q, state = _bnb().quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    parts = state.as_dict()
    tensors = {"weight": q, "absmax": parts["absmax"], "quant_map": parts["quant_map"],
               "nested_absmax": parts["nested_absmax"], "nested_quant_map": parts["nested_quant_map"]}
    info = {k: v for k, v in parts.items() if not isinstance(v, Tensor)}
    return Packed("nf4", shape, tensors, {"state": {**info, "shape": list(shape)}})


def _nf4_state(tensors: dict[str, Tensor], state: dict, device):
    qs = {**{k: v for k, v in tensors.items() if k != "weight"}, **state}
    return _bnb().QuantState.from_dict(qs, device=device)


def dequantize_packed(p: Packed, dtype: torch.dtype = torch.float32) -> Tensor:
    """The full (out, in) weight of a packed one."""
    if p.kind == "ggml":
        return ggml.dequantize(p.tensors["raw"], p.info["type"], p.shape, dtype)
    if p.kind == "scaled":
        w, scale = p.tensors["weight"], p.tensors["scale"]
        return (w.float() * (scale[:, None] if scale.numel() > 1 else scale)).to(dtype)
    if p.kind == "nf4":
        w = p.tensors["weight"]
        return _bnb().dequantize_4bit(w, _nf4_state(p.tensors, p.info["state"], w.device)).reshape(p.shape).to(dtype)
    raise ValueError(f"unknown packed weight kind {p.kind!r}")


# --- modules --------------------------------------------------------------------------------------------------

class QuantLinear(nn.Module):
    """A Linear whose weight is stored compactly and expanded on each forward; `weight` expands it on demand."""

    def __init__(self, packed: Packed, bias: Tensor | None, compute_dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = packed.shape
        self.kind, self.info, self.compute_dtype = packed.kind, packed.info, compute_dtype
        for name, t in packed.tensors.items():  # not persistent: state_dict() writes the expanded weight instead
            self.register_buffer("q_" + name, t, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.to(compute_dtype), requires_grad=False)

    @property
    def packed(self) -> Packed:
        tensors = {name.removeprefix("q_"): t for name, t in self._buffers.items()}
        return Packed(self.kind, (self.out_features, self.in_features), tensors, self.info)

    @property
    def weight(self) -> Tensor:
        return self.dequantize(self.compute_dtype)

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        return dequantize_packed(self.packed, dtype)

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype if x.is_floating_point() else self.compute_dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        if self.kind == "scaled":  # scale the output rows: cheaper than scaling the weight
            scale = self.q_scale.to(dtype)
            y = F.linear(x, self.q_weight.to(dtype)) * scale
            return y if bias is None else y + bias
        return F.linear(x, self.dequantize(dtype), bias)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def extra_repr(self) -> str:
        what = self.info["type"].name if self.kind == "ggml" else \
            str(self.q_weight.dtype).removeprefix("torch.") if self.kind == "scaled" else self.kind
        return f"in_features={self.in_features}, out_features={self.out_features}, {what}, bias={self.bias is not None}"

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_model(model: nn.Module, fmt: str, compute_dtype: torch.dtype | None = None) -> int:
    """Replace every eligible `nn.Linear` by a QuantLinear in format `fmt`, in place; returns how many."""
    fmt_ = parse_format(fmt)
    replaced = 0
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and quantizable(name + ".weight", tuple(module.weight.shape), fmt_):
            dtype = compute_dtype or module.weight.dtype
            device = module.weight.device
            q = QuantLinear(pack_weight(module.weight, fmt_), module.bias, dtype).to(device)
            set_module(model, name, q)
            replaced += 1
    return replaced


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantLinear) for m in model.modules())
