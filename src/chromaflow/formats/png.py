"""PNG outputs with generation metadata: an A1111-style `parameters` chunk and a JSON `chromaflow` chunk.

The `parameters` text is what A1111/Forge, Civitai and image browsers parse; the JSON chunk holds every
setting exactly, so an image can be regenerated from it.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, PngImagePlugin

from .checkpoint import atomic_write

# our setting name -> A1111 infotext key, in A1111's key order
_INFOTEXT_KEYS = [("steps", "Steps"), ("sampler", "Sampler"), ("scheduler", "Schedule type"), ("cfg", "CFG scale"),
                  ("seed", "Seed"), ("size", "Size"), ("model_hash", "Model hash"), ("model", "Model"),
                  ("shift", "Shift"), ("version", "Version")]


def _quote(value) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def image_settings(settings: dict, index: int) -> dict:
    """The settings of image `index` of a batch: its own seed (seed + index) and, for prompt lists, its prompt."""
    s = dict(settings, seed=settings["seed"] + index)
    per_prompt = max(1, int(settings.get("batch_size", 1)))
    for key in ("prompt", "negative_prompt"):
        if isinstance(s.get(key), list):
            s[key] = s[key][index // per_prompt] if s[key] else ""
    return s


# A1111 / Forge display names -> ours (ComfyUI's): infotexts and A1111 servers show these; engine.sampling's
# resolve_* accept them in any case
A1111_SAMPLERS = {
    "Euler": "euler", "Euler a": "euler_ancestral", "Heun": "heun", "DPM2": "dpm_2", "DPM2 a": "dpm_2_ancestral",
    "DPM++ 2S a": "dpmpp_2s_ancestral", "DPM++ 2M": "dpmpp_2m", "DPM++ 2M SDE": "dpmpp_2m_sde",
    "DPM++ 2M SDE Heun": "dpmpp_2m_sde_heun", "DPM++ 3M SDE": "dpmpp_3m_sde", "LMS": "lms", "IPNDM": "ipndm",
    "DEIS": "deis", "UniPC": "uni_pc", "LCM": "lcm", "DDIM": "ddim", "DDIM CFG++": "euler_cfg_pp",
    "Euler CFG++": "euler_cfg_pp", "DPM++ 2M CFG++": "dpmpp_2m_cfg_pp", "Restart": "restart",
    "RES Multistep": "res_multistep",
}
A1111_SCHEDULERS = {
    "Uniform": "normal", "Simple": "simple", "Normal": "normal", "SGM Uniform": "sgm_uniform", "DDIM": "ddim_uniform",
    "Karras": "karras", "Exponential": "exponential", "Beta": "beta", "KL Optimal": "kl_optimal",
}
# ours -> the A1111 display name (the first listed where two map to one), for infotexts and A1111 API replies
A1111_SAMPLER_LABELS = {ours: label for label, ours in reversed(list(A1111_SAMPLERS.items()))}
A1111_SCHEDULER_LABELS = {ours: label for label, ours in reversed(list(A1111_SCHEDULERS.items()))}

def infotext(settings: dict, index: int = 0) -> str:
    """A1111 `parameters` text for image `index` of a batch (its seed is seed + index)."""
    s = image_settings(settings, index)
    s["size"] = f"{s['width']}x{s['height']}"
    s["sampler"] = A1111_SAMPLER_LABELS.get(s["sampler"], str(s["sampler"]))  # "DPM++ 2M", as A1111 writes it
    s["scheduler"] = A1111_SCHEDULER_LABELS.get(s["scheduler"], str(s["scheduler"]).title())
    lines = [s["prompt"]]
    if s.get("negative_prompt"):
        lines.append(f"Negative prompt: {s['negative_prompt']}")
    lines.append(", ".join(f"{key}: {_quote(s[name])}" for name, key in _INFOTEXT_KEYS if s.get(name) not in (None, "")))
    return "\n".join(lines)


def save_png(image: Image.Image, path: str | Path, settings: dict | None = None, index: int = 0,
             extra_text: dict[str, str] | None = None) -> Path:
    """Write atomically (temp file + rename), so a crash never leaves a half-written image."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    if settings is not None:
        info.add_text("parameters", infotext(settings, index))
        info.add_text("chromaflow", json.dumps(image_settings(settings, index), ensure_ascii=False))
    for key, value in (extra_text or {}).items():
        info.add_text(key, value)
    with atomic_write(path) as f:
        image.save(f, format="PNG", pnginfo=info)
    return path


def read_png_settings(path: str | Path) -> dict:
    """The JSON settings chunk of a PNG we wrote (empty dict if absent)."""
    with Image.open(path) as im:
        raw = im.text.get("chromaflow") if hasattr(im, "text") else None
    return json.loads(raw) if raw else {}
