"""LoRA on the transformer: apply files at run time or merged, remove them exactly, train new ones.

Runtime: a forward hook on each patched Linear adds `up @ (down @ x)` to its output, so the module tree, the state
dict and quantized layers stay untouched (the only way on a GGUF / NF4 base). Merged: the weight itself becomes
W + ΔW, computed in float32; the original tensor is kept aside, so removing restores it bit for bit. "auto" merges
into plain weights and hooks quantized ones, as stable-diffusion.cpp does.

Training: `add_lora` attaches trainable LowRank adapters (down Kaiming-initialised, up zero: the model starts
exactly at the base) to Linears chosen by name patterns; `adapter_weights` hands them to formats.lora for saving.
"""

from __future__ import annotations

import fnmatch
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..formats.lora import LoRAFile, linear_shapes, read_lora
from .quant import QuantLinear

LoRASpec = tuple["str | os.PathLike | LoRAFile", float]  # (file or parsed LoRA, strength)
DEFAULT_TARGETS = ("double_blocks.*", "single_blocks.*")


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, QuantLinear))


def combined(lora: LoRAFile, module: str, out_features: int, strength: float) -> tuple[Tensor, Tensor]:
    """All patches of one LoRA on one layer as a single (down (R, in), up (out, R)) pair, strength and scale folded
    into `up`; rows a patch does not cover are zero (a q-only LoRA leaves k, v and the MLP rows alone)."""
    downs, ups = [], []
    for p in lora.patches[module]:
        up = torch.zeros(out_features, p.down.shape[0])
        up[p.rows if p.rows is not None else slice(None)] = p.up.float() * (strength * p.scale)
        downs.append(p.down.float())
        ups.append(up)
    return torch.cat(downs), torch.cat(ups, 1)


class _RuntimeDelta:
    """Forward hook: output += x @ down.T @ up.T, cast to the activation dtype (cached per dtype / device)."""

    def __init__(self, down: Tensor, up: Tensor):
        self.down, self.up = down, up
        self._cast: dict = {}

    def __call__(self, module, args, output):
        x = args[0]
        key = (x.dtype, x.device)
        if key not in self._cast:
            self._cast = {key: (self.down.to(x.device, x.dtype), self.up.to(x.device, x.dtype))}
        down, up = self._cast[key]
        return output + F.linear(F.linear(x, down), up)


@dataclass
class AppliedLoRAs:
    """What `apply_loras` did; `remove()` takes every LoRA off again (hooks removed, merged weights restored)."""
    reports: list[dict] = field(default_factory=list)
    hooks: list = field(default_factory=list)
    backups: dict[str, tuple[nn.Parameter, Tensor]] = field(default_factory=dict)  # module -> (weight, original)

    def remove(self) -> None:
        for handle in self.hooks:
            handle.remove()
        with torch.no_grad():
            for weight, original in self.backups.values():
                weight.copy_(original)
        self.hooks, self.backups = [], {}


def _architecture(model: nn.Module) -> str:
    params = getattr(model, "params", None)
    return getattr(params, "variant", "chroma") if params is not None else "chroma"


def apply_loras(model: nn.Module, loras: Sequence[LoRASpec], mode: str = "auto") -> AppliedLoRAs:
    """Apply LoRA files (kohya, diffusers/PEFT or original naming) with per-LoRA strength to a transformer.

    mode: "runtime" (hooks), "merge" (into the weights; refused for quantized layers) or "auto" (merge where the
    weight is plain, runtime where it is quantized). Every file is read and checked before anything is applied.
    Returns a handle whose `remove()` restores the model exactly; `reports` say what matched per file."""
    if mode not in ("auto", "merge", "runtime"):
        raise ValueError(f"LoRA mode must be auto, merge or runtime, got {mode!r}")
    shapes = linear_shapes(model)
    modules = dict(model.named_modules())
    arch = _architecture(model)
    parsed = [(spec if isinstance(spec, LoRAFile) else read_lora(spec, shapes, arch), float(strength))
              for spec, strength in loras]
    if mode == "merge":
        quantized = [m for lora, _ in parsed for m in lora.patches if isinstance(modules[m], QuantLinear)]
        if quantized:
            raise ValueError(f"cannot merge a LoRA into quantized layers ({quantized[0]}, ...): merging would need "
                             "requantizing, which loses precision; use mode='runtime' or 'auto'")
    applied = AppliedLoRAs()
    for lora, strength in parsed:
        for name in lora.patches:
            module = modules[name]
            down, up = combined(lora, name, module.out_features, strength)
            if isinstance(module, QuantLinear) or mode == "runtime":
                applied.hooks.append(module.register_forward_hook(_RuntimeDelta(down, up)))
                continue
            weight = module.weight
            if name not in applied.backups:
                applied.backups[name] = (weight, weight.detach().clone())
            with torch.no_grad():
                weight.copy_((weight.float() + up.to(weight.device) @ down.to(weight.device)).to(weight.dtype))
        applied.reports.append({**lora.report(), "strength": strength})
    return applied


# --- training -------------------------------------------------------------------------------------------------

class LowRank(nn.Module):
    """A trainable adapter for one Linear: delta(x) = alpha/rank · up(down(x))."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float | None = None):
        super().__init__()
        self.down = nn.Parameter(torch.empty(rank, in_features))
        self.up = nn.Parameter(torch.zeros(out_features, rank))  # zero: training starts at the base model
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
        self.rank, self.alpha = rank, float(alpha if alpha is not None else rank)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.down), self.up) * self.scale


def _slot(name: str) -> str:
    return name.replace(".", "__")  # ModuleDict keys cannot hold dots


def lora_targets(model: nn.Module, patterns: Sequence[str] = DEFAULT_TARGETS) -> list[str]:
    """Names of the Linears matching any fnmatch pattern (e.g. "double_blocks.*.img_attn.*", "single_blocks.*")."""
    names = [n for n, m in model.named_modules() if _is_linear(m) and any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not names:
        raise ValueError(f"LoRA target patterns {list(patterns)} match no Linear layer of the model")
    return names


def add_lora(model: nn.Module, rank: int, alpha: float | None = None,
             targets: Sequence[str] = DEFAULT_TARGETS) -> tuple[nn.ModuleDict, list]:
    """Attach trainable adapters to the matching Linears (the model's own weights are left alone; freeze them).
    Returns the adapters (register them where the optimizer and DDP see them) and the hook handles."""
    modules = dict(model.named_modules())
    adapters = nn.ModuleDict()
    hooks = []
    for name in lora_targets(model, targets):
        m = modules[name]
        device = next(itertools.chain(m.parameters(), m.buffers())).device
        adapter = LowRank(m.in_features, m.out_features, rank, alpha).to(device)
        adapters[_slot(name)] = adapter
        hooks.append(m.register_forward_hook(lambda mod, args, out, a=adapter: out + a(args[0])))
    return adapters, hooks


def adapter_weights(adapters: nn.ModuleDict) -> dict[str, tuple[Tensor, Tensor, float]]:
    """{module: (down, up, alpha)} as formats.lora.save_lora takes it."""
    return {slot.replace("__", "."): (a.down.detach().float().cpu(), a.up.detach().float().cpu(), a.alpha)
            for slot, a in adapters.items()}
