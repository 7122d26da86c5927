"""Chroma / Flux transformer checkpoints: original <-> diffusers key layouts, detection, config inference, load, save.

A conversion is a *plan*: for every target key, the source tensors (or row ranges of them) to concatenate along
dim 0. Plans are pure split / cat, so conversions are bit-exact both ways, and a loader can build one target
tensor at a time from a lazily read checkpoint, never holding two copies of the model (spec
chroma-architecture.md §5). Our `MMDiT` uses the original names, so its state dict is an original-layout checkpoint.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import Tensor, nn

from ..models.transformer import MMDiT, MMDiTParams, build
from .checkpoint import DIFFUSERS_WEIGHTS, Checkpoint, CheckpointError, atomic_write, open_checkpoint, save_checkpoint

Part = tuple[str, slice | None]  # a source key and the rows (dim 0) taken from it; None = the whole tensor
Plan = dict[str, list[Part]]  # target key -> parts, concatenated along dim 0 in order

LAYOUTS = ("original", "diffusers")
PREFIXES = ("model.diffusion_model.", "transformer.")  # trainer / ComfyUI exports; diffusers pipeline state dicts

# original template -> diffusers template(s); {i} = block index, {p} = weight|bias. Several diffusers names mean
# the original tensor is them stacked on dim 0, each `hidden` rows except the last, which takes the rest
# (fused qkv; single-block linear1 = [q, k, v, mlp_in]).
_DOUBLE = {
    "img_mod.lin.{p}": "norm1.linear.{p}",
    "txt_mod.lin.{p}": "norm1_context.linear.{p}",
    "img_attn.qkv.{p}": "attn.to_q.{p} attn.to_k.{p} attn.to_v.{p}",
    "txt_attn.qkv.{p}": "attn.add_q_proj.{p} attn.add_k_proj.{p} attn.add_v_proj.{p}",
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
    "img_attn.proj.{p}": "attn.to_out.0.{p}",
    "txt_attn.proj.{p}": "attn.to_add_out.{p}",
    "img_mlp.0.{p}": "ff.net.0.proj.{p}",
    "img_mlp.2.{p}": "ff.net.2.{p}",
    "txt_mlp.0.{p}": "ff_context.net.0.proj.{p}",
    "txt_mlp.2.{p}": "ff_context.net.2.{p}",
}
_SINGLE = {
    "linear1.{p}": "attn.to_q.{p} attn.to_k.{p} attn.to_v.{p} proj_mlp.{p}",
    "linear2.{p}": "proj_out.{p}",
    "norm.query_norm.scale": "attn.norm_q.weight",
    "norm.key_norm.scale": "attn.norm_k.weight",
    "modulation.lin.{p}": "norm.linear.{p}",
}
# original (shift, scale); diffusers' AdaLayerNormContinuous wants (scale, shift)
_SWAPPED = "final_layer.adaLN_modulation.1.{p}"
_RULES = {
    "img_in.{p}": "x_embedder.{p}",
    "txt_in.{p}": "context_embedder.{p}",
    "final_layer.linear.{p}": "proj_out.{p}",
    _SWAPPED: "norm_out.linear.{p}",
    **{f"{o}.{a}.{{p}}": f"time_text_embed.{d}_embedder.{b}.{{p}}"
       for o, d in (("time_in", "timestep"), ("vector_in", "text"), ("guidance_in", "guidance"))
       for a, b in (("in_layer", "linear_1"), ("out_layer", "linear_2"))},
    "distilled_guidance_layer.in_proj.{p}": "distilled_guidance_layer.in_proj.{p}",
    "distilled_guidance_layer.out_proj.{p}": "distilled_guidance_layer.out_proj.{p}",
    "distilled_guidance_layer.layers.{i}.in_layer.{p}": "distilled_guidance_layer.layers.{i}.linear_1.{p}",
    "distilled_guidance_layer.layers.{i}.out_layer.{p}": "distilled_guidance_layer.layers.{i}.linear_2.{p}",
    "distilled_guidance_layer.norms.{i}.scale": "distilled_guidance_layer.norms.{i}.weight",
    **{f"double_blocks.{{i}}.{o}": " ".join(f"transformer_blocks.{{i}}.{x}" for x in d.split())
       for o, d in _DOUBLE.items()},
    **{f"single_blocks.{{i}}.{o}": " ".join(f"single_transformer_blocks.{{i}}.{x}" for x in d.split())
       for o, d in _SINGLE.items()},
}


def _regex(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)"))


_COMPILED = [(o, d.split(), {"original": [_regex(o)], "diffusers": [_regex(x) for x in d.split()]})
             for o, d in _RULES.items()]


def _few(keys: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(repr(k) for k in list(keys)[:n])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


# --- detection ------------------------------------------------------------------------------------------------

def strip_prefix(keys: Iterable[str]) -> dict[str, str]:
    """Map bare transformer key -> key as stored. With a known prefix present, only keys under it are kept (a full
    checkpoint's VAE / text-encoder keys are left out)."""
    keys = list(keys)
    for prefix in PREFIXES:
        if any(k.startswith(prefix) for k in keys):
            return {k[len(prefix):]: k for k in keys if k.startswith(prefix)}
    return {k: k for k in keys}


def detect_layout(keys: Iterable[str]) -> str:
    """"original" (BFL / Chroma single file) or "diffusers"."""
    keys = list(strip_prefix(keys))
    found = [name for name, marks in (("original", ("double_blocks.", "single_blocks.", "img_in.", "final_layer.")),
                                      ("diffusers", ("transformer_blocks.", "single_transformer_blocks.",
                                                     "x_embedder.", "proj_out.")))
             if any(k.startswith(marks) for k in keys)]
    if len(found) != 1:
        what = "mixes original and diffusers keys" if found else "is neither an original nor a diffusers layout"
        raise CheckpointError(f"{what}; is this a Chroma / Flux transformer? keys: {_few(sorted(keys))}")
    return found[0]


def detect_architecture(keys: Iterable[str]) -> str:
    """"chroma", "flux-dev" or "flux-schnell", by the same marker keys diffusers uses (either layout)."""
    keys = set(strip_prefix(keys))
    if "distilled_guidance_layer.in_proj.bias" in keys:
        return "chroma"
    if keys & {"guidance_in.in_layer.weight", "time_text_embed.guidance_embedder.linear_1.weight"}:
        return "flux-dev"
    if keys & {"time_in.in_layer.weight", "time_text_embed.timestep_embedder.linear_1.weight"}:
        return "flux-schnell"
    raise CheckpointError("not a Chroma or Flux transformer (no distilled_guidance_layer, time_in or time_text_embed "
                          f"keys); keys: {_few(sorted(keys))}")


# --- conversion plans -----------------------------------------------------------------------------------------

def _groups(keys: Iterable[str], layout: str) -> tuple[dict[str, tuple[list[str], bool]], list[str]]:
    """Each matched original key -> (its diffusers keys, halves swapped); plus the keys no rule knows."""
    groups, unknown = {}, []
    for key in keys:
        for orig, diffs, regexes in _COMPILED:
            m = next((m for r in regexes[layout] if (m := r.fullmatch(key))), None)
            if m:
                groups[orig.format(**m.groupdict())] = ([d.format(**m.groupdict()) for d in diffs], orig == _SWAPPED)
                break
        else:
            unknown.append(key)
    return groups, unknown


def _swap_halves(key: str, rows: int) -> list[Part]:
    return [(key, slice(rows // 2, rows)), (key, slice(0, rows // 2))]


def conversion_plan(shapes: Mapping[str, Sequence[int]], to: str) -> Plan:
    """Plan converting the (prefix-free) keys in `shapes` to layout `to`. Unknown keys pass through unchanged,
    so a loader reports them as unexpected rather than losing them."""
    if to not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {to!r}")
    src = detect_layout(shapes)
    if src == to:
        return {k: [(k, None)] for k in shapes}
    groups, unknown = _groups(shapes, src)
    plan: Plan = {k: [(k, None)] for k in unknown}
    absent: list[str] = []
    for orig, (diffs, swapped) in groups.items():
        if to == "original":
            lacking = [d for d in diffs if d not in shapes]
            absent += lacking
            if not lacking:
                plan[orig] = _swap_halves(diffs[0], shapes[diffs[0]][0]) if swapped else [(d, None) for d in diffs]
            continue
        rows = shapes[orig][0]
        if swapped:
            plan[diffs[0]] = _swap_halves(orig, rows)
            continue
        if len(diffs) > 1:
            hidden = shapes.get("img_in.weight", (0,))[0]
            sizes = [hidden] * (len(diffs) - 1) + [rows - hidden * (len(diffs) - 1)]
            if not hidden or sizes[-1] <= 0:
                raise CheckpointError(f"cannot split {orig!r} ({rows} rows) into {', '.join(diffs)}: "
                                      "needs img_in.weight to give the hidden size")
        else:
            sizes = [rows]
        for d, start, n in zip(diffs, itertools.accumulate([0] + sizes), sizes):
            plan[d] = [(orig, None if n == rows else slice(start, start + n))]
    if absent:
        raise CheckpointError(f"missing {len(absent)} diffusers tensors needed to rebuild fused original tensors: "
                              f"{_few(absent)}; the checkpoint is incomplete")
    return plan


def planned_shape(parts: list[Part], shapes: Mapping[str, Sequence[int]]) -> tuple[int, ...]:
    """Shape of the tensor a plan entry builds, from source shapes alone."""
    if len(parts) == 1 and parts[0][1] is None:
        return tuple(shapes[parts[0][0]])
    full = [tuple(shapes[k]) for k, _ in parts]
    if len({s[1:] for s in full}) != 1:
        raise CheckpointError(f"cannot stack {', '.join(k for k, _ in parts)}: shapes {full} differ past dim 0")
    rows = sum(s[0] if r is None else len(range(*r.indices(s[0]))) for (_, r), s in zip(parts, full))
    return (rows, *full[0][1:])


def combine(parts: list[Part], fetch: Callable[[str, slice | None], Tensor]) -> Tensor:
    """Build one target tensor; `fetch(key, rows)` reads a source tensor or a row range of it."""
    pieces = [fetch(key, rows) for key, rows in parts]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def convert(tensors: Mapping[str, Tensor], to: str) -> dict[str, Tensor]:
    """Convert a state dict (either layout, prefix allowed) to layout `to`. Splits are views, not copies."""
    keymap = strip_prefix(tensors)
    plan = conversion_plan({k: tuple(tensors[s].shape) for k, s in keymap.items()}, to)

    def fetch(key: str, rows: slice | None) -> Tensor:
        t = tensors[keymap[key]]
        return t if rows is None else t[rows]

    return {k: combine(parts, fetch) for k, parts in plan.items()}


def original_to_diffusers(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return _convert_from(tensors, "original", "diffusers")


def diffusers_to_original(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return _convert_from(tensors, "diffusers", "original")


def _convert_from(tensors: Mapping[str, Tensor], src: str, dst: str) -> dict[str, Tensor]:
    if (layout := detect_layout(tensors)) != src:
        raise CheckpointError(f"expected {src}-layout keys, got {layout} layout")
    return convert(tensors, dst)


# --- config inference -----------------------------------------------------------------------------------------

def default_axes_dim(head_dim: int) -> tuple[int, int, int]:
    """RoPE axes when a file records none: axis 0 gets head_dim/8 (even), the rest is split evenly in even
    parts. For head_dim 128 this is Flux's (16, 56, 56)."""
    a0 = 2 * max(1, head_dim // 16)
    a1 = 2 * ((head_dim - a0) // 4)
    return a0, a1, head_dim - a0 - a1


def _count(shapes: Mapping[str, Sequence[int]], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return max((int(m.group(1)) + 1 for k in shapes if (m := pat.match(k))), default=0)


def infer_params(shapes: Mapping[str, Sequence[int]], metadata: Mapping[str, str] | None = None, *,
                 axes_dim: Sequence[int] | None = None) -> MMDiTParams:
    """Model config of a checkpoint: from `chromaflow.params` metadata if present, else from tensor shapes (either
    layout). RoPE axes are not visible in shapes: `axes_dim` if given, else `default_axes_dim(head_dim)`."""
    try:
        if metadata and "chromaflow.params" in metadata:
            return MMDiTParams.from_dict(json.loads(metadata["chromaflow.params"]))
        keymap = strip_prefix(shapes)
        shapes = {k: tuple(shapes[s]) for k, s in keymap.items()}
        if detect_layout(shapes) == "diffusers":
            shapes = {k: planned_shape(p, shapes) for k, p in conversion_plan(shapes, "original").items()}

        def dim(key: str) -> tuple[int, ...]:
            if key not in shapes:
                raise CheckpointError(f"cannot infer the model config: no {key!r}")
            return shapes[key]

        hidden, in_channels = dim("img_in.weight")
        depth, single = _count(shapes, "double_blocks"), _count(shapes, "single_blocks")
        attn = "double_blocks.0.img_attn." if depth else "single_blocks.0."
        head_dim = dim(attn + "norm.query_norm.scale")[0]
        mlp = dim("double_blocks.0.img_mlp.0.weight")[0] if depth else dim("single_blocks.0.linear2.weight")[1] - hidden
        kw = dict(in_channels=in_channels, out_channels=dim("final_layer.linear.weight")[0],
                  context_in_dim=dim("txt_in.weight")[1], hidden_size=hidden, num_heads=hidden // head_dim,
                  depth=depth, depth_single_blocks=single, mlp_ratio=mlp / hidden,
                  axes_dim=tuple(axes_dim) if axes_dim else default_axes_dim(head_dim),
                  qkv_bias=not depth or "double_blocks.0.img_attn.qkv.bias" in shapes)
        if "distilled_guidance_layer.in_proj.weight" in shapes:
            a_hidden, a_in = dim("distilled_guidance_layer.in_proj.weight")
            kw.update(variant="chroma", guidance_embed=True, approximator_in_dim=a_in, approximator_hidden=a_hidden,
                      approximator_depth=_count(shapes, "distilled_guidance_layer.layers"))
        else:
            kw.update(variant="flux", guidance_embed="guidance_in.in_layer.weight" in shapes,
                      vec_in_dim=dim("vector_in.in_layer.weight")[1])
        return MMDiTParams(**kw)
    except CheckpointError:
        raise
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"inconsistent model config: {e}") from None


# --- loading --------------------------------------------------------------------------------------------------

@dataclass
class TransformerFile:
    """What a checkpoint's headers say about the transformer in it; `plan` builds our (original) keys."""
    ckpt: Checkpoint
    keymap: dict[str, str]  # bare key -> key as stored
    layout: str
    architecture: str
    params: MMDiTParams
    plan: Plan
    shapes: dict[str, tuple[int, ...]]  # original-layout key -> shape the plan builds

    @property
    def prefix(self) -> str:
        bare, stored = next(iter(self.keymap.items()), ("", ""))
        return stored[:len(stored) - len(bare)]

    def get(self, key: str) -> Tensor:
        """One original-layout tensor, read (and converted) from the file."""
        return combine(self.plan[key], lambda k, rows: self.ckpt.get(self.keymap[k], rows))


# families whose files must not be read as a Chroma / Flux transformer even when their keys look alike (SD3's
# diffusers keys resemble Flux's); a declared architecture naming neither flux nor chroma is one of them
_OUR_FAMILIES = ("flux", "chroma")


def check_declared_architecture(metadata: Mapping[str, str]) -> None:
    """Refuse files whose own metadata (GGUF `general.architecture`, `modelspec.architecture`) names another model
    family, or says the file is an adapter (LoRA) rather than a model."""
    gguf_arch = metadata.get("general.architecture")
    if gguf_arch is not None and gguf_arch not in _OUR_FAMILIES:
        raise CheckpointError(f"GGUF architecture is {gguf_arch!r}, not a Flux / Chroma transformer ('flux'); "
                              "pass a Chroma or Flux GGUF")
    spec = metadata.get("modelspec.architecture")
    if spec:
        base, _, adapter = spec.partition("/")
        if adapter:
            raise CheckpointError(f"is a {adapter} for {base} (modelspec.architecture {spec!r}), not a model; "
                                  "apply it to a model with loras=[(path, strength)]")
        if not any(f in base.lower() for f in _OUR_FAMILIES):
            raise CheckpointError(f"is a {spec!r} model (modelspec.architecture), not a Chroma / Flux transformer")


def analyze(ckpt: Checkpoint) -> TransformerFile:
    """Detect layout, architecture and config from headers only; errors name the file."""
    try:
        check_declared_architecture(ckpt.metadata)
        keymap = strip_prefix(ckpt.keys())
        shapes = {k: ckpt.shape(s) for k, s in keymap.items()}
        layout, arch = detect_layout(shapes), detect_architecture(shapes)
        plan = conversion_plan(shapes, "original")
        built = {k: planned_shape(parts, shapes) for k, parts in plan.items()}
        params = infer_params(built, ckpt.metadata, axes_dim=ckpt.config.get("axes_dims_rope"))
    except CheckpointError as e:
        raise CheckpointError(f"{ckpt.name}: {e}") from None
    return TransformerFile(ckpt, keymap, layout, arch, params, plan, built)


def _check_fits(tf: TransformerFile, expected: Mapping[str, tuple[int, ...]]) -> None:
    missing = [k for k in expected if k not in tf.plan]
    unexpected = [k for k in tf.plan if k not in expected]
    wrong = [f"{k} expected {expected[k]}, got {tf.shapes[k]}"
             + ("" if tf.plan[k] == [(k, None)] else f" (from {', '.join(dict.fromkeys(s for s, _ in tf.plan[k]))})")
             for k in expected if k in tf.shapes and tf.shapes[k] != expected[k]]
    problems = [f"{len(missing)} missing keys: {_few(missing)}" if missing else "",
                f"{len(unexpected)} unexpected keys: {_few(unexpected)}" if unexpected else "",
                f"{len(wrong)} wrong shapes: {'; '.join(wrong[:5])}" if wrong else ""]
    if any(problems):
        raise CheckpointError(
            f"{tf.ckpt.name}: does not fit a {tf.architecture} transformer ({tf.layout} layout, "
            f"hidden {tf.params.hidden_size}): {'; '.join(p for p in problems if p)}. The file is incomplete, "
            "modified, or not a plain transformer checkpoint: re-export it or pass the matching file")


def _main_dtype(ckpt: Checkpoint, keys: Iterable[str]) -> torch.dtype:
    """The dtype holding most parameters; 8-bit storage is widened to bfloat16 for compute."""
    counts = Counter()
    for k in keys:
        counts[ckpt.dtype(k)] += ckpt.numel(k)
    dtype = counts.most_common(1)[0][0] if counts else torch.float32
    return dtype if dtype.is_floating_point and dtype.itemsize > 1 else torch.bfloat16


def load_transformer(path: str | os.PathLike, dtype: torch.dtype | None = None,
                     device: str | torch.device = "cpu", quantize: str | None = None) -> tuple[MMDiT, dict]:
    """Load a Chroma / Flux transformer from a safetensors file, shard index, folder or GGUF, in either layout.

    Everything is checked from headers before any tensor is read; then each parameter is read (memory-mapped),
    converted, cast and copied on its own, so peak memory is about one model. `dtype=None` keeps the file's main
    dtype (bfloat16 when weights are quantized), or float32 where that type is slow on `device` (bf16 on a CPU
    without AVX-512 BF16 / AMX: models.precision). GGUF and low-bit (fp8, int8, NF4) weights stay compact in memory
    as models.quant.QuantLinear layers, expanded per layer on each forward; `quantize` ("int8", "fp8", "nf4",
    "Q8_0", "Q4_K", ...) compacts the remaining eligible layers the same way while loading.
    Returns the model in eval mode and an info dict (layout, architecture, params, dtype, files, metadata)."""
    from ..models.precision import runnable
    from ..models.quant import QuantLinear, pack_weight, parse_format, quantizable, set_module
    fmt = parse_format(quantize) if quantize else None
    with open_checkpoint(path) as ckpt:
        tf = analyze(ckpt)
        model = build(tf.params, device="meta")
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        _check_fits(tf, expected)
        linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        packed = {}  # module name -> Packed: compact weights used as stored (only when not split or fused)
        for key in expected:
            parts = tf.plan[key]
            if key.endswith(".weight") and key[:-7] in linears and len(parts) == 1 and parts[0][1] is None:
                if (p := ckpt.packed(tf.keymap[parts[0][0]])) is not None:
                    packed[key[:-7]] = p
        if dtype is None:  # the file's own precision, or fp32 where that half type is slow on this device
            dtype = runnable(torch.bfloat16 if packed or fmt else _main_dtype(ckpt, tf.keymap.values()), device)
        state = {}
        for key in expected:
            module = key[:-7] if key.endswith(".weight") else None
            if module in packed:
                continue
            tensor = tf.get(key)  # Checkpoint.get hands out owned copies and releases the mapped pages
            if fmt is not None and module in linears and quantizable(key, expected[key], fmt):
                packed[module] = pack_weight(tensor, fmt)
            else:
                state[key] = tensor.to(device=device, dtype=dtype)
        for module, p in packed.items():
            set_module(model, module, QuantLinear(p, state.pop(module + ".bias", None), dtype).to(device))
        model.load_state_dict(state, strict=False, assign=True)
        unset = [n for n, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
        if unset:  # never hand out a half-loaded model
            raise CheckpointError(f"{ckpt.name}: {len(unset)} tensors were not loaded: {_few(unset)}")
        quantized = Counter(_packed_name(p) for p in packed.values())
        info = {"path": str(path), "files": [str(f) for f in ckpt.files], "layout": tf.layout,
                "architecture": tf.architecture, "params": tf.params.to_dict(), "dtype": str(dtype).split(".")[-1],
                "prefix": tf.prefix, "ignored_keys": len(ckpt) - len(tf.keymap), "metadata": dict(ckpt.metadata),
                "quantized": dict(quantized)}
    return model.eval(), info


def _packed_name(p) -> str:
    if p.kind == "ggml":
        return p.info["type"].name
    if p.kind == "scaled":
        return "int8" if p.tensors["weight"].dtype == torch.int8 else str(p.tensors["weight"].dtype).split(".")[-1]
    return p.kind


# --- saving ---------------------------------------------------------------------------------------------------

_BFL = "https://github.com/black-forest-labs/flux"
MODELSPEC = {"chroma": ("chroma", "https://huggingface.co/lodestones/Chroma"),  # ids as kohya's sai_model_spec
             "flux-dev": ("flux-1-dev", _BFL), "flux-schnell": ("flux-1-schnell", _BFL)}


def modelspec(architecture: str, title: str, layout: str = "original", resolution: str | None = None,
              adapter: str | None = None) -> dict[str, str]:
    """The ModelSpec 1.0 MUST keys plus date and (for image models) resolution "WxH"; `adapter` ("lora") marks
    an adapter for the architecture ("chroma/lora")."""
    arch, implementation = MODELSPEC[architecture]
    spec = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": f"{arch}/{adapter}" if adapter else arch,
            "modelspec.implementation": "diffusers" if layout == "diffusers" else implementation,
            "modelspec.title": title, "modelspec.date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if resolution:
        spec["modelspec.resolution"] = resolution
    return spec


def read_modelspec(metadata: Mapping[str, str]) -> dict[str, str]:
    """The `modelspec.*` entries of a file's metadata, without the prefix."""
    return {k.removeprefix("modelspec."): v for k, v in metadata.items() if k.startswith("modelspec.")}


def diffusers_config(params: MMDiTParams) -> dict:
    """config.json for diffusers' ChromaTransformer2DModel / FluxTransformer2DModel (fixed mlp_ratio 4, qkv bias)."""
    try:
        version = importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        version = "0.36.0"
    p = params
    config = {"patch_size": 1, "in_channels": p.in_channels, "out_channels": p.out_channels, "num_layers": p.depth,
              "num_single_layers": p.depth_single_blocks, "attention_head_dim": p.head_dim,
              "num_attention_heads": p.num_heads, "joint_attention_dim": p.context_in_dim,
              "axes_dims_rope": list(p.axes_dim)}
    if p.variant == "chroma":
        return {"_class_name": "ChromaTransformer2DModel", "_diffusers_version": version, **config,
                "approximator_num_channels": p.approximator_in_dim, "approximator_hidden_dim": p.approximator_hidden,
                "approximator_layers": p.approximator_depth}
    return {"_class_name": "FluxTransformer2DModel", "_diffusers_version": version, **config,
            "pooled_projection_dim": p.vec_in_dim, "guidance_embeds": p.guidance_embed}


def _write_sharded(tensors: Mapping[str, Tensor], file: Path, metadata: dict[str, str],
                   max_shard_size: int | None) -> Path:
    """One file, or `<stem>-0000i-of-0000n.safetensors` shards of at most `max_shard_size` bytes plus the index."""
    index = file.with_name(file.name + ".index.json")
    shards: list[list[str]] = [[]]
    filled = 0
    for key, t in tensors.items():
        n = t.numel() * t.element_size()
        if max_shard_size and shards[-1] and filled + n > max_shard_size:
            shards.append([])
            filled = 0
        shards[-1].append(key)
        filled += n
    if len(shards) == 1:
        save_checkpoint(tensors, file, metadata)
        index.unlink(missing_ok=True)  # a stale index would shadow the new file
        return file
    stem = file.name.removesuffix(".safetensors")
    weight_map = {}
    for i, keys in enumerate(shards, 1):
        name = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_checkpoint({k: tensors[k] for k in keys}, file.parent / name, metadata)
        weight_map.update(dict.fromkeys(keys, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with atomic_write(index, "w") as f:  # written last: an interrupted save leaves no index to half a set
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return index


def save_transformer(model_or_state_dict: MMDiT | Mapping[str, Tensor], path: str | os.PathLike,
                     layout: str = "original", metadata: Mapping[str, str] | None = None, *,
                     params: MMDiTParams | None = None, title: str | None = None, resolution: str | None = None,
                     max_shard_size: int | None = None) -> Path:
    """Write a transformer in `layout` with `chromaflow.params` and ModelSpec metadata; returns what to open.

    `path` is a .safetensors file, or (diffusers layout) a folder that receives `diffusion_pytorch_model.safetensors`
    and a diffusers config.json. `max_shard_size` (bytes) splits the weights into shards plus an index json."""
    path = Path(path)
    if isinstance(model_or_state_dict, nn.Module):
        state = model_or_state_dict.state_dict()
        params = params or getattr(model_or_state_dict, "params", None)
    else:
        state = model_or_state_dict
    tensors = convert(state, layout)
    params = params or infer_params({k: tuple(t.shape) for k, t in tensors.items()}, metadata)
    meta = {"chromaflow.params": json.dumps(params.to_dict()), "chromaflow.layout": layout,
            **modelspec(detect_architecture(tensors), title or path.stem, layout, resolution),
            **{str(k): str(v) for k, v in (metadata or {}).items()}}
    if path.suffix == ".safetensors":
        return _write_sharded(tensors, path, meta, max_shard_size)
    if layout != "diffusers":
        raise ValueError(f"{path}: an original-layout checkpoint is a single .safetensors file; give a file name")
    if params.position_grid:
        warnings.warn(f"{path}: diffusers has no equivalent of position_grid {params.position_grid} (positions that "
                      "scale with the image); chromaflow reads it back from the weights' metadata, but diffusers "
                      "would place one position per token and draw different images", stacklevel=2)
    path.mkdir(parents=True, exist_ok=True)
    with atomic_write(path / "config.json", "w") as f:
        json.dump(diffusers_config(params), f, indent=2)
    _write_sharded(tensors, path / DIFFUSERS_WEIGHTS, meta, max_shard_size)
    return path
