"""LoRA files for Chroma / Flux: kohya, diffusers / PEFT and original (BFL, ai-toolkit) key layouts.

Every layout is read into one form: for each Linear of our transformer (original-layout module name), a list of
patches `(rows, down, up, scale)` with ΔW[rows] = scale · up @ down. A diffusers LoRA on `attn.to_q` becomes a
patch on rows [0, hidden) of the fused `img_attn.qkv`; `proj_mlp` the last rows of a single block's `linear1`
(spec inference-techniques.md §8). The name table comes from the same conversion plan that converts checkpoints
(formats.layouts), so LoRA names and checkpoint names cannot drift apart.

Scale: alpha / rank when the file has `.alpha` (kohya), else 1 (diffusers folds it into the weights).
Writing: kohya (`lora_unet_<name with _>.lora_down/.lora_up/.alpha`) and diffusers
(`transformer.<diffusers name>.lora_A/.lora_B`, fused layers split: down copied, up row-split, scale folded in).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .checkpoint import CheckpointError, open_checkpoint, save_checkpoint
from .layouts import _few, conversion_plan, modelspec

Target = tuple[str, slice | None]  # (original-layout module, rows of its weight; None = all)

# (down suffix, up suffix) pairs in the wild; `.alpha` sits beside them
_PAIRS = ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight"),
          (".lora_A.default.weight", ".lora_B.default.weight"), (".lora.down.weight", ".lora.up.weight"),
          ("_lora.down.weight", "_lora.up.weight"), (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"))
_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "lora_unet_",
             "lora_transformer_", "lycoris_", "unet.")
_TEXT_PREFIXES = ("lora_te", "text_encoder", "te_", "te1_", "te2_", "lora_clip", "clip_", "t5")
# variants that are not plain low-rank products; named so the error says what the file is
_VARIANTS = {".hada_w1_a": "LoHa", ".lokr_w1": "LoKr", ".lokr_w1_a": "LoKr", ".dora_scale": "DoRA",
             ".diff": "full-weight diff", ".diff_b": "full-weight diff"}


@dataclass
class Patch:
    rows: slice | None
    down: Tensor  # (rank, in)
    up: Tensor  # (len(rows), rank)
    scale: float  # alpha / rank (1 without alpha); strength is applied later


@dataclass
class LoRAFile:
    """A parsed LoRA: patches per target module plus what did not match (for reporting)."""
    name: str
    layout: str  # kohya | diffusers | original | mixed
    metadata: dict[str, str]
    patches: dict[str, list[Patch]] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)  # keys that name no layer of this model
    text_encoder_keys: list[str] = field(default_factory=list)  # not applied: the transformer only

    @property
    def matched(self) -> int:
        return sum(len(p) for p in self.patches.values())

    def report(self) -> dict:
        return {"file": self.name, "layout": self.layout, "patched_layers": len(self.patches),
                "patches": self.matched, "unmatched": list(self.unmatched),
                "text_encoder_keys": len(self.text_encoder_keys)}


def linear_shapes(model_or_shapes) -> dict[str, tuple[int, int]]:
    """{module.weight: (out, in)} for every Linear of a model (plain or quantized), or filtered from a shape dict."""
    if isinstance(model_or_shapes, Mapping):
        return {k: tuple(s) for k, s in model_or_shapes.items() if k.endswith(".weight") and len(s) == 2}
    return {f"{name}.weight": (m.out_features, m.in_features) for name, m in model_or_shapes.named_modules()
            if hasattr(m, "in_features") and hasattr(m, "out_features")}


def target_table(shapes: Mapping[str, tuple[int, int]]) -> dict[str, list[Target]]:
    """Every name a LoRA may use for a layer -> the original-layout (module, rows) it covers. Names: original and
    diffusers, dotted and with dots as underscores (kohya's form)."""
    table: dict[str, list[Target]] = {k[:-7]: [(k[:-7], None)] for k in shapes}
    for dkey, parts in conversion_plan(dict(shapes), "diffusers").items():
        if dkey.endswith(".weight") and dkey[:-7] not in table:
            table[dkey[:-7]] = [(src[:-7], rows) for src, rows in parts]
    for name, targets in list(table.items()):
        table.setdefault(name.replace(".", "_"), targets)
    return table


def _rows_len(rows: slice | None, total: int) -> int:
    return total if rows is None else len(range(*rows.indices(total)))


def _stem(key: str) -> tuple[str, str] | None:
    for down, up in _PAIRS:
        if key.endswith(down):
            return key[:-len(down)], "down"
        if key.endswith(up):
            return key[:-len(up)], "up"
    if key.endswith(".alpha"):
        return key[:-6], "alpha"
    return None


def _bare(stem: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if stem.startswith(prefix):
                stem, changed = stem[len(prefix):], True
    return stem


def _layout(stems: list[str]) -> str:
    kinds = set()
    for s in stems:
        if s.startswith("lora_unet_") or s.startswith("lora_transformer_"):
            kinds.add("kohya")
        elif "transformer_blocks." in s or s.startswith("transformer."):
            kinds.add("diffusers")
        else:
            kinds.add("original")
    return kinds.pop() if len(kinds) == 1 else "mixed"


def _family_hint(keys: list[str], metadata: Mapping[str, str]) -> str:
    spec = metadata.get("modelspec.architecture", "")
    if spec:
        return f"the file says it is for {spec!r}"
    joined = " ".join(keys[:50])
    if re.search(r"(down|up|input|output)_blocks|mid_block|middle_block", joined):
        return "its keys look like a Stable Diffusion UNet LoRA"
    if "_mod_lin" in joined or "_mod.lin" in joined or "modulation" in joined or "norm1.linear" in joined:
        return "its keys target Flux's per-block modulation layers, which Chroma does not have"
    return "it may be for another model family or size"


def check_lora_family(name: str, metadata: Mapping[str, str]) -> None:
    spec = metadata.get("modelspec.architecture", "")
    if spec and not any(f in spec.lower() for f in ("flux", "chroma")):
        raise CheckpointError(f"{name}: a LoRA for {spec!r} (modelspec.architecture), not for Chroma / Flux; "
                              "use a LoRA trained for this model")


def parse_lora(tensors: Mapping[str, Tensor], shapes: Mapping[str, tuple[int, int]], name: str = "LoRA",
               metadata: Mapping[str, str] | None = None, architecture: str = "chroma") -> LoRAFile:
    """Match a LoRA state dict against a transformer's Linear shapes (`linear_shapes`). Raises when nothing
    matches or shapes disagree; partial matches are kept in `unmatched` (and warned about by `read_lora`)."""
    metadata = dict(metadata or {})
    check_lora_family(name, metadata)
    for key in tensors:
        for marker, kind in _VARIANTS.items():
            if key.endswith(marker) or f"{marker}." in key:
                raise CheckpointError(f"{name}: {key!r} is a {kind} tensor; only plain LoRA (up/down pairs) is "
                                      "supported: convert or merge it to a standard LoRA first")
    groups: dict[str, dict[str, Tensor]] = {}
    out = LoRAFile(name, "", metadata)
    for key, t in tensors.items():
        parsed = _stem(key)
        if parsed is None:
            out.unmatched.append(key)
        else:
            groups.setdefault(parsed[0], {})[parsed[1]] = t
    table = target_table(shapes)
    out.layout = _layout(list(groups))
    for stem, parts in groups.items():
        bare = _bare(stem)
        if stem.startswith(_TEXT_PREFIXES) or bare.startswith(_TEXT_PREFIXES):
            out.text_encoder_keys.append(stem)
            continue
        targets = table.get(bare)
        if targets is None or "down" not in parts or "up" not in parts:
            lacking = "up" if "down" in parts else "down"
            out.unmatched.append(stem if targets is None else f"{stem} (lacks its {lacking})")
            continue
        down, up = parts["down"].float(), parts["up"].float()
        if down.ndim != 2 or up.ndim != 2:  # conv-shaped (r, in, 1, 1) LoRAs on a Linear
            down, up = down.flatten(1), up.flatten(1)
        rank = down.shape[0]
        scale = float(parts["alpha"]) / rank if "alpha" in parts else 1.0
        rows_total = sum(_rows_len(rows, shapes[m + ".weight"][0]) for m, rows in targets)
        module0 = targets[0][0]
        expected_in = shapes[module0 + ".weight"][1]
        if down.shape[1] != expected_in or up.shape != (rows_total, rank):
            raise CheckpointError(
                f"{name}: {stem!r} has down {tuple(down.shape)} / up {tuple(up.shape)}, but layer {bare!r} of this "
                f"{architecture} transformer needs down (rank, {expected_in}) / up ({rows_total}, rank); "
                "the LoRA is for another model size or family")
        start = 0
        for module, rows in targets:
            n = _rows_len(rows, shapes[module + ".weight"][0])
            out.patches.setdefault(module, []).append(Patch(rows, down, up[start:start + n], scale))
            start += n
    if not out.patches:
        what = f"{len(tensors)} keys" + (f" ({len(out.text_encoder_keys)} text-encoder LoRAs, not applied)"
                                         if out.text_encoder_keys else "")
        raise CheckpointError(f"{name}: none of its {what} match a layer of this {architecture} transformer "
                              f"({_family_hint(list(tensors), metadata)}); unmatched: {_few(out.unmatched)}")
    return out


def read_lora(path: str | os.PathLike, shapes: Mapping[str, tuple[int, int]],
              architecture: str = "chroma") -> LoRAFile:
    """Read and match a LoRA file (safetensors); warns when some keys match nothing."""
    with open_checkpoint(path) as ckpt:
        tensors = {k: ckpt.get(k) for k in ckpt.keys()}
        metadata = dict(ckpt.metadata)
    lora = parse_lora(tensors, shapes, str(path), metadata, architecture)
    if lora.unmatched:
        warnings.warn(f"{path}: {len(lora.unmatched)} LoRA keys match no layer of this {architecture} transformer "
                      f"and are skipped ({_family_hint(lora.unmatched, metadata)}): {_few(lora.unmatched)}",
                      stacklevel=2)
    return lora


# --- writing --------------------------------------------------------------------------------------------------

def lora_tensors(adapters: Mapping[str, tuple[Tensor, Tensor, float]], shapes: Mapping[str, tuple[int, int]],
                 layout: str = "kohya") -> dict[str, Tensor]:
    """Tensors of a LoRA in `layout` from full-row adapters {module: (down, up, alpha)}: ΔW = alpha/rank up @ down."""
    out: dict[str, Tensor] = {}
    if layout == "kohya":
        for module, (down, up, alpha) in adapters.items():
            stem = "lora_unet_" + module.replace(".", "_")
            out[f"{stem}.lora_down.weight"] = down.contiguous()
            out[f"{stem}.lora_up.weight"] = up.contiguous()
            out[f"{stem}.alpha"] = torch.tensor(float(alpha), dtype=down.dtype)
        return out
    if layout != "diffusers":
        raise ValueError(f"LoRA layout must be kohya or diffusers, got {layout!r}")
    covering: dict[str, list[tuple[str, list[slice | None]]]] = {}  # module -> (diffusers name, its row ranges)
    for dkey, parts in conversion_plan(dict(shapes), "diffusers").items():
        if dkey.endswith(".weight") and parts[0][0] in shapes:
            covering.setdefault(parts[0][0][:-7], []).append((dkey[:-7], [rows for _, rows in parts]))
    for module, (down, up, alpha) in adapters.items():
        scaled_up = up * (float(alpha) / down.shape[0])  # PEFT then applies its default alpha/r = 1
        for dname, row_ranges in covering[module]:
            piece = torch.cat([scaled_up if rows is None else scaled_up[rows] for rows in row_ranges])
            out[f"transformer.{dname}.lora_A.weight"] = down.contiguous()
            out[f"transformer.{dname}.lora_B.weight"] = piece.contiguous()
    return out


def lora_metadata(architecture: str, title: str, rank: int, alpha: float, layout: str,
                  resolution: str | None = None) -> dict[str, str]:
    """ModelSpec (`chroma/lora`) plus the kohya keys UIs read to show rank and alpha."""
    return {**modelspec(architecture, title, "diffusers" if layout == "diffusers" else "original", resolution,
                        adapter="lora"),
            "ss_network_module": "networks.lora_flux", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
            "ss_base_model_version": architecture, "chromaflow.lora_layout": layout}


def save_lora(adapters: Mapping[str, tuple[Tensor, Tensor, float]], path: str | os.PathLike,
              shapes: Mapping[str, tuple[int, int]], layout: str = "kohya", *, architecture: str = "chroma",
              title: str | None = None, resolution: str | None = None) -> Path:
    """Write trained adapters {module: (down, up, alpha)} as a kohya or diffusers LoRA with ModelSpec metadata."""
    path = Path(path)
    rank = max((d.shape[0] for d, _, _ in adapters.values()), default=0)
    alpha = next((a for _, _, a in adapters.values()), 0.0)
    meta = lora_metadata(architecture, title or path.stem, rank, alpha, layout, resolution)
    return save_checkpoint(lora_tensors(adapters, shapes, layout), path, meta)
