"""Which half precision a device runs fast, so weights stored in bf16 / fp16 run in a dtype that is quick here.

bf16 halves memory everywhere, but its speed depends on the hardware: a CPU with AVX-512 BF16 or AMX runs bf16
matmuls ~2x faster than fp32, while an AVX2-only CPU (most laptops, older servers) emulates them far slower
(measured on an AVX2 EPYC: 0.3 GFLOP/s bf16 vs 144 fp32 at 2048x2048; the built-in model's 20-step image took 10 s
in bf16, 2 s in fp32). Stored half-precision weights therefore run in fp32 where the half type would be slow.
An explicit dtype from the user is always kept; CHROMAFLOW_FAST_BF16=1 / 0 overrides the CPU detection.
"""

from __future__ import annotations

import functools
import os
import platform
import warnings

import torch


@functools.lru_cache(maxsize=None)
def _cpu_features() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return " ".join(line for line in f if line.lower().startswith(("flags", "features")))
    except OSError:
        return ""


def fast_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether bf16 matmuls on `device` are at least as fast as fp32 (native instructions, not emulation)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return True  # mps / xpu: their own backends pick kernels; keep the stored dtype
    forced = os.environ.get("CHROMAFLOW_FAST_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "bf16" in _cpu_features().split()
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def fast_fp16(device: str | torch.device = "cpu") -> bool:
    device = torch.device(device)
    return torch.cpu._is_amx_fp16_supported() if device.type == "cpu" else True


def runnable(dtype: torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """`dtype`, or float32 where `dtype` is a half type this device would run slowly."""
    if dtype == torch.bfloat16 and not fast_bf16(device):
        return torch.float32
    if dtype == torch.float16 and not fast_fp16(device):
        return torch.float32
    return dtype


def run_fast(module: torch.nn.Module, device: str | torch.device = "cpu") -> torch.nn.Module:
    """`module` converted to float32 when its parameters are in a half type this device runs slowly (a module
    without quantized tensors: `float()` would expand fp8 weights too)."""
    dtypes = {p.dtype for p in module.parameters()}
    return module.float() if any(runnable(d, device) != d for d in dtypes) else module


def bf16_autocast(device: str | torch.device, enabled: bool = True):
    """bf16 autocast on `device` when asked for and fast there; otherwise a no-op context (fp32), with a warning
    when it was asked for. Training configs say `bf16: true` once; each machine then runs what is fast on it."""
    device = torch.device(device)
    on = enabled and fast_bf16(device)
    if enabled and not on:
        _warn_emulated(device.type)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)


@functools.lru_cache(maxsize=None)  # once per process and device type
def _warn_emulated(device_type: str) -> None:
    warnings.warn(f"bf16 was asked for, but this {device_type} has no native bf16 matmuls (emulated bf16 is many "
                  f"times slower): running in float32. CHROMAFLOW_FAST_BF16=1 forces bf16.", stacklevel=3)
