"""The front door to sampling: names -> functions, `schedule(...)`, `sample(...)`, and the pieces callers import.

The implementations live beside it: schedules.py (t schedules and shifts), samplers.py (one function per sampler),
guidance.py (CFG and its variants). Our names are ComfyUI's `sampler_name` / `scheduler` strings; A1111 / Forge
labels ("Euler a", "DPM++ 2M", "Karras"), k-diffusion aliases ("k_dpmpp_2m") and combined A1111 names
("DPM++ 2M Karras" = sampler + scheduler) resolve to the same functions via resolve_sampler / resolve_scheduler.
"""

from __future__ import annotations

import inspect

from torch import Tensor
from tqdm.auto import tqdm

from ..formats.png import A1111_SAMPLER_LABELS, A1111_SAMPLERS, A1111_SCHEDULER_LABELS, A1111_SCHEDULERS
from .guidance import CFG_MODES, Guidance, GuidedDenoiser, cfg_denoiser
from .samplers import SAMPLERS, Denoiser, Generator, StepCallback, randn_like, sample_euler
from .schedules import SCHEDULERS, SHIFT_IGNORED, T_MIN, flux_mu, resolve_shift, shift_time

__all__ = ["CFG_MODES", "Guidance", "GuidedDenoiser", "cfg_denoiser", "SAMPLERS", "SCHEDULERS", "SHIFT_IGNORED",
           "T_MIN", "flux_mu", "resolve_shift", "shift_time", "sample_euler", "randn_like", "schedule", "sample",
           "check_name", "sampler_options", "resolve_sampler", "resolve_scheduler", "A1111_SAMPLERS",
           "A1111_SCHEDULERS", "A1111_SAMPLER_LABELS", "A1111_SCHEDULER_LABELS"]

_OTHER_SAMPLER_ALIASES = {  # k-diffusion / A1111 short aliases; ComfyUI's *_gpu variants (our noise is always CPU)
    "k_euler": "euler", "k_euler_a": "euler_ancestral", "k_euler_ancestral": "euler_ancestral", "k_heun": "heun",
    "k_dpm_2": "dpm_2", "k_dpm_2_a": "dpm_2_ancestral", "k_dpmpp_2s_a": "dpmpp_2s_ancestral", "k_dpmpp_2m": "dpmpp_2m",
    "k_dpmpp_2m_sde": "dpmpp_2m_sde", "k_dpmpp_3m_sde": "dpmpp_3m_sde", "k_lms": "lms",
    "dpmpp_2m_sde_gpu": "dpmpp_2m_sde", "dpmpp_2m_sde_heun_gpu": "dpmpp_2m_sde_heun",
    "dpmpp_3m_sde_gpu": "dpmpp_3m_sde",
}
AUTOMATIC = "automatic"  # A1111's scheduler "Automatic": the model's default


def _key(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").replace("-", " ").split())


def _lookup(registry: dict, *aliases: dict) -> dict[str, str]:
    table = {_key(name): name for name in registry}
    for alias in aliases:
        table.update({_key(k): v for k, v in alias.items()})
    return table


_SAMPLER_KEYS = _lookup(SAMPLERS, A1111_SAMPLERS, _OTHER_SAMPLER_ALIASES)
_SCHEDULER_KEYS = _lookup(SCHEDULERS, A1111_SCHEDULERS)


def check_name(name: str, registry: dict, kind: str) -> str:
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; valid: {', '.join(registry)}")
    return name


def resolve_sampler(name: str) -> tuple[str, str | None]:
    """(our sampler name, the scheduler a combined A1111 name carries or None): "DPM++ 2M Karras" ->
    ("dpmpp_2m", "karras"), "Euler a" -> ("euler_ancestral", None)."""
    key = _key(name)
    if key in _SAMPLER_KEYS:
        return _SAMPLER_KEYS[key], None
    for scheduler_key, scheduler in _SCHEDULER_KEYS.items():
        head = key.removesuffix(" " + scheduler_key)
        if head != key and head in _SAMPLER_KEYS:
            return _SAMPLER_KEYS[head], scheduler
    raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)} "
                     f"(A1111 names such as 'Euler a' or 'DPM++ 2M Karras' work too)")


def resolve_scheduler(name: str) -> str | None:
    """Our scheduler name for a ComfyUI / A1111 one; None for "Automatic" (use the model's default)."""
    key = _key(name)
    if key == AUTOMATIC:
        return None
    if key not in _SCHEDULER_KEYS:
        raise ValueError(f"unknown scheduler {name!r}; valid: {', '.join(SCHEDULERS)}")
    return _SCHEDULER_KEYS[key]


def schedule(steps: int, scheduler: str = "simple", shift: float = 1.0) -> Tensor:
    """Descending t of length steps + 1 ending at 0 from a named schedule, with the shift applied on top."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return SCHEDULERS[check_name(scheduler, SCHEDULERS, "scheduler")](steps, shift)


def sampler_options(sampler: str) -> list[str]:
    """The options a sampler takes beyond the common signature (eta, s_noise, order, ...)."""
    common = {"denoise", "x", "sigmas", "callback", "generator"}
    return [p for p in inspect.signature(SAMPLERS[sampler]).parameters if p not in common]


def sample(sampler: str, denoise: Denoiser, x: Tensor, sigmas: Tensor, callback: StepCallback | None = None,
           progress: bool = True, generator: Generator = None, **options) -> Tensor:
    """Run a named sampler with a tqdm bar over its steps. `generator` reaches stochastic samplers only; `options`
    are the sampler's own keywords (sampler_options(name))."""
    fn = SAMPLERS[check_name(sampler, SAMPLERS, "sampler")]
    unknown = set(options) - set(sampler_options(sampler))
    if unknown:
        raise ValueError(f"{sampler} has no option {', '.join(sorted(unknown))}; "
                         f"its options: {', '.join(sampler_options(sampler)) or 'none'}")
    if fn.stochastic:
        options["generator"] = generator
    bar = tqdm(total=len(sigmas) - 1, desc=sampler, disable=not progress, leave=False)

    def step(i, t, x_, x0):
        bar.update(1)
        if callback is not None:
            callback(i, t, x_, x0)

    try:
        return fn(denoise, x, sigmas, callback=step, **options)
    finally:
        bar.close()
