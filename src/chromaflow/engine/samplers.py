"""Samplers for rectified flow, one function each: `sampler(denoise, x, sigmas, callback=None, **options) -> x`.

Conventions (DESIGN.md): sigma == t, t = 1 is noise; `denoise(x, t) -> x0_hat` with t a scalar tensor; the velocity is
v = (x - x0_hat) / t, so k-diffusion's ODE dx/dsigma = (x - D) / sigma *is* the flow ODE dx/dt = v and the classic
ODE solvers carry over unchanged. What must be flow-specific is (a) every step that injects noise, which has to
rescale the signal as x_t = (1 - t) x0 + t eps does (the "RF renoise" rule, `_renoise`), and (b) the log-SNR
solvers (DPM-Solver++, UniPC), which use the flow's half-log-SNR lambda(t) = log((1 - t) / t), as diffusers does.
In those coordinates the first-order step is exactly Euler: (s/t) x + (1 - s/t) x0_hat.

lambda(1) = -inf, so a step that starts at t = 1 spans an infinite log-SNR interval: log-SNR samplers take it first
order and keep no history from it (a multistep method has nothing to interpolate through at lambda = -inf). A last
step to t = 0 returns x0_hat wherever the solver works in lambda (lambda(0) = +inf), as k-diffusion and diffusers do.

Each sampler is registered by name in SAMPLERS and carries `nfe` (model evaluations per step), `stochastic` (it
takes `generator=`) and `needs_uncond` (CFG++: it calls `denoise.with_uncond(x, t) -> (x0_guided, x0_uncond)`,
see guidance.GuidedDenoiser). Noise comes from CPU generators, so a seed gives the same image on every device.
"""

from __future__ import annotations

import inspect
import math
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from .guidance import GuidedDenoiser

Denoiser = Callable[[Tensor, Tensor], Tensor]
# callback(step, t, x, x0_hat) once per step; raising from it stops sampling
StepCallback = Callable[[int, float, Tensor, Tensor], None]
Generator = torch.Generator | Sequence[torch.Generator] | None

SAMPLERS: dict[str, Callable[..., Tensor]] = {}


def register(*names: str, nfe: int, needs_uncond: bool = False):
    """Add a sampler under one or more names, recording what it costs and needs."""
    def add(fn):
        fn.nfe, fn.needs_uncond = nfe, needs_uncond
        fn.stochastic = "generator" in inspect.signature(fn).parameters
        for name in names:
            SAMPLERS[name] = fn
        return fn
    return add


# --- shared pieces ----------------------------------------------------------------------------------------------

def randn_like(x: Tensor, generator: Generator) -> Tensor:
    """Standard normal noise shaped like x, drawn on the CPU. `generator` is one torch.Generator, one per batch row
    (row i then reproduces alone, as the pipeline's images do), or None for torch's global generator."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
        noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generator])
    else:
        noise = torch.randn(x.shape, generator=generator)
    return noise.to(x.device, x.dtype)


def _lam(t: float) -> float:
    """Half log-SNR of the flow, log((1 - t) / t): -inf at t = 1, +inf at t = 0."""
    return -math.inf if t >= 1 else math.inf if t <= 0 else math.log((1 - t) / t)


def _euler(x: Tensor, x0: Tensor, t: float, s: float) -> Tensor:
    """Euler from t to s: x + (s - t) v == (s/t) x + (1 - s/t) x0_hat (also DDIM and first-order DPM-Solver++)."""
    return torch.lerp(x0, x, s / t)


def _renoise(x: Tensor, t: float, s: float, noise: Tensor) -> Tensor:
    """The flow's forward transition from t up to s >= t: a sample of x_t becomes an exact sample of x_s."""
    scale = (1 - s) / (1 - t)
    return scale * x + math.sqrt(max(s * s - (t * scale) ** 2, 0.0)) * noise


def _ancestral_target(t: float, s: float, eta: float) -> float:
    """Where the deterministic part of an RF ancestral step lands before renoising to s (eta 0: s; eta 1: s^2/t)."""
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must be in [0, 1] for rectified flow, got {eta}")
    return s * (1 + (s / t - 1) * eta)


def _report(callback: StepCallback | None, i: int, t: float, x: Tensor, x0: Tensor) -> None:
    if callback is not None:
        callback(i, t, x, x0)


def _at(sigmas: Tensor, t: float) -> Tensor:
    return sigmas.new_tensor(t)


# --- Euler family -----------------------------------------------------------------------------------------------

@register("euler", "ddim", nfe=1)
def sample_euler(denoise: Denoiser, x: Tensor, sigmas: Tensor, callback: StepCallback | None = None) -> Tensor:
    """Euler on dx/dt = v. For flow, DDIM (eta 0) is the same update, so "ddim" names this function too."""
    ts = sigmas.tolist()
    for i in range(len(ts) - 1):
        x0 = denoise(x, sigmas[i])
        _report(callback, i, ts[i], x, x0)
        x = _euler(x, x0, ts[i], ts[i + 1])
    return x


def _ancestral(denoise: Denoiser, x: Tensor, sigmas: Tensor, callback, generator, eta: float, s_noise: float,
               step: Callable[[Tensor, Tensor, float, float], Tensor]) -> Tensor:
    """The ancestral loop: `step(x, x0, t, down)` solves down to a lower t, fresh noise brings x back up to the next
    t by the flow's forward rule."""
    ts = sigmas.tolist()
    for i in range(len(ts) - 1):
        t, s = ts[i], ts[i + 1]
        x0 = denoise(x, sigmas[i])
        _report(callback, i, t, x, x0)
        down = _ancestral_target(t, s, eta)
        x = step(x, x0, t, down)
        if s > 0 and down < s:
            x = _renoise(x, down, s, s_noise * randn_like(x, generator))
    return x


@register("euler_ancestral", nfe=1)
def sample_euler_ancestral(denoise: Denoiser, x: Tensor, sigmas: Tensor, callback: StepCallback | None = None,
                           generator: Generator = None, eta: float = 1.0, s_noise: float = 1.0) -> Tensor:
    """Euler down to a lower t, then fresh noise back up to the next t."""
    return _ancestral(denoise, x, sigmas, callback, generator, eta, s_noise, _euler)


@register("lcm", nfe=1)
def sample_lcm(denoise: Denoiser, x: Tensor, sigmas: Tensor, callback: StepCallback | None = None,
               generator: Generator = None) -> Tensor:
    """Consistency-model step: jump to x0_hat, renoise to the next t with fresh noise. Exact for a consistency model;
    with a mean-predicting denoiser it converges as the last nonzero t goes to 0."""
    ts = sigmas.tolist()
    for i in range(len(ts) - 1):
        t, s = ts[i], ts[i + 1]
        x0 = denoise(x, sigmas[i])
        _report(callback, i, t, x, x0)
        x = x0 if s == 0 else torch.lerp(x0, randn_like(x, generator), s)
    return x


# --- two evaluations per step -----------------------------------------------------------------------------------

def _heun_step(denoise: Denoiser, x: Tensor, t: float, s: float, sigmas: Tensor, report: Callable) -> Tensor:
    x0 = denoise(x, _at(sigmas, t))
    report(t, x, x0)
    if s == 0:  # v is undefined at t = 0: the last step is Euler
        return x0
    v = (x - x0) / t
    x_pred = x + (s - t) * v
    v_next = (x_pred - denoise(x_pred, _at(sigmas, s))) / s
    return x + (s - t) * (v + v_next) / 2


@register("heun", nfe=2)
def sample_heun(denoise: Denoiser, x: Tensor, sigmas: Tensor, callback: StepCallback | None = None) -> Tensor:
    """Heun's trapezoid (Karras et al. Alg. 2); second order."""
    ts = sigmas.tolist()
    for i in range(len(ts) - 1):
        x = _heun_step(denoise, x, ts[i], ts[i + 1], sigmas, lambda t, x_, x0: _report(callback, i, t, x_, x0))
    return x


def _dpm2_step(denoise: Denoiser, x: Tensor, x0: Tensor, t: float, s: float, sigmas: Tensor) -> Tensor:
    """Midpoint method with the midpoint at sqrt(t s) (k-diffusion's DPM-Solver-2); Euler when s == 0."""
    if s == 0:
        return x0
    t_mid = math.sqrt(t * s)
    x_mid = _euler(x, x0, t, t_mid)
    v_mid = (x_mid - denoise(x_mid, _at(sigmas, t_mid))) / t_mid
    return x + (s - t) * v_mid


@register("dpm_2", nfe=2)
def sample_dpm_2(denoise: Denoiser, x: Tensor, sigmas: Tensor, callback: StepCallback | None = None) -> Tensor:
    """DPM-Solver-2 (midpoint in log t); second order."""
    ts = sigmas.tolist()
    for i in range(len(ts) - 1):
        x0 = denoise(x, sigmas[i])
        _report(callback, i, ts[i], x, x0)
        x = _dpm2_step(denoise, x, x0, ts[i], ts[i + 1], sigmas)
    return x


@register("dpm_2_ancestral", nfe=2)
def sample_dpm_2_ancestral(denoise: Denoiser, x: Tensor, sigmas: Tensor, callback: StepCallback | None = None,
                           generator: Generator = None, eta: float = 1.0, s_noise: float = 1.0) -> Tensor:
    """DPM-Solver-2 down to the ancestral target, then the RF renoise."""
    return _ancestral(denoise, x, sigmas, callback, generator, eta, s_noise,
                      lambda x_, x0, t, down: _dpm2_step(denoise, x_, x0, t, down, sigmas))


@register("dpmpp_2s_ancestral", nfe=2)
def sample_dpmpp_2s_ancestral(denoise: Denoiser, x: Tensor, sigmas: Tensor, callback: StepCallback | None = None,
                              generator: Generator = None, eta: float = 1.0, s_noise: float = 1.0) -> Tensor:
    """DPM-Solver++(2S): a half step in lambda, its x0_hat drives the full step; then the RF renoise."""
    def step(x_, x0, t, down):
        if down == 0 or t >= 1:  # no finite lambda midpoint: first-order step
            return _euler(x_, x0, t, down)
        t_mid = 1 / (1 + math.exp((_lam(t) + _lam(down)) / 2))
        return _euler(x_, denoise(_euler(x_, x0, t, t_mid), _at(sigmas, t_mid)), t, down)
    return _ancestral(denoise, x, sigmas, callback, generator, eta, s_noise, step)


# --- DPM-Solver++ multistep (2M, 2M SDE, 3M SDE, RES, CFG++) in the flow's lambda ---------------------------------

def _dpmpp_multistep(predict: Callable[[Tensor, Tensor], tuple[Tensor, Tensor | None]], x: Tensor, sigmas: Tensor,
                     callback: StepCallback | None, *, order: int, midpoint: bool = False, eta: float = 0.0,
                     s_noise: float = 1.0, generator: Generator = None) -> Tensor:
    """The one DPM-Solver++ multistep loop. With h = lambda(s) - lambda(t), h_eta = (1 + eta) h:
        x_s = (s/t) e^{-eta h} x + (1 - s)(1 - e^{-h_eta}) x0 + higher-order terms + s sqrt(1 - e^{-2 eta h}) noise
    order 2 adds the divided difference of x0 with k-diffusion's midpoint or phi_2 ("heun") weight, order 3 the
    second difference with 2 phi_3 (see sample_dpmpp_3m_sde). `predict` returns (x0, x0_uncond); when x0_uncond is
    given (CFG++), the noise direction is the unconditional one: + (s (1 - t) / t) e^{-eta h} (x0 - x0_uncond),
    which turns the first-order step into the flow form of CFG++, (1 - s) x0_cfg + s eps_uncond."""
    ts = sigmas.tolist()
    history: list[tuple[Tensor, float]] = []  # (x0 at an earlier step, that step's h), newest first
    for i in range(len(ts) - 1):
        t, s = ts[i], ts[i + 1]
        x0, x0_uncond = predict(x, sigmas[i])
        _report(callback, i, t, x, x0)
        if s == 0:
            x = x0
            continue
        ratio = s * (1 - t) / (t * (1 - s))  # e^{-h}; 0 when t == 1
        h = -math.log(ratio) if ratio > 0 else math.inf
        h_eta, decay = (1 + eta) * h, ratio ** (1 + eta)  # decay = e^{-h_eta}
        x_next = (s / t) * ratio ** eta * x + (1 - s) * (1 - decay) * x0
        if x0_uncond is not None:
            x_next = x_next + (s * (1 - t) / t) * ratio ** eta * (x0 - x0_uncond)
        if order >= 2 and history and math.isfinite(h):
            phi_2 = 1 + math.expm1(-h_eta) / h_eta
            x1, h1 = history[0]
            if order >= 3 and len(history) >= 2:
                x2, h2 = history[1]
                r0, r1 = h1 / h, h2 / h
                d1_0, d1_1 = (x0 - x1) / r0, (x1 - x2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x_next = x_next + (1 - s) * (phi_2 * d1 - 2 * (phi_2 / h_eta - 0.5) * d2)
            else:
                weight = 0.5 * (1 - decay) if midpoint else phi_2
                x_next = x_next + (1 - s) * weight * (h / h1) * (x0 - x1)
        if eta > 0:
            x_next = x_next + s * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise * randn_like(x, generator)
        history = [(x0, h)] + history[:1] if math.isfinite(h) else []
        x = x_next
    return x


def _plain(denoise: Denoiser):
    return lambda x, t: (denoise(x, t), None)


def _with_uncond(denoise: GuidedDenoiser, name: str):
    if not hasattr(denoise, "with_uncond"):
        raise TypeError(f"{name} needs the unconditional prediction: pass a guidance.GuidedDenoiser, whose "
                        "with_uncond(x, t) returns (x0_guided, x0_uncond)")
    return denoise.with_uncond


@register("dpmpp_2m", nfe=1)
def sample_dpmpp_2m(denoise: Denoiser, x: Tensor, sigmas: Tensor, callback: StepCallback | None = None) -> Tensor:
    """DPM-Solver++(2M): Euler with x0_hat extrapolated in lambda, x0 + (h / 2 h_prev)(x0 - x0_prev); second order.
    Matches diffusers' DPMSolverMultistepScheduler in flow mode (first and last steps first order)."""
    return _dpmpp_multistep(_plain(denoise), x, sigmas, callback, order=2, midpoint=True)


@register("res_multistep", nfe=1)
def sample_res_multistep(denoise: Denoiser, x: Tensor, sigmas: Tensor, callback: StepCallback | None = None) -> Tensor:
    """RES multistep: integrates x0_hat linear in lambda exactly (phi_2 weight, = DPM-Solver++(2M) "heun")."""
    return _dpmpp_multistep(_plain(denoise), x, sigmas, callback, order=2)


@register("dpmpp_2m_sde", nfe=1)
def sample_dpmpp_2m_sde(denoise: Denoiser, x: Tensor, sigmas: Tensor, callback: StepCallback | None = None,
                        generator: Generator = None, eta: float = 1.0, s_noise: float = 1.0,
                        solver: str = "midpoint") -> Tensor:
    """DPM-Solver++(2M) SDE in the flow's lambda; eta 0 is dpmpp_2m ("midpoint") or res_multistep ("heun")."""
    if solver not in ("midpoint", "heun"):
        raise ValueError(f"solver must be 'midpoint' or 'heun', got {solver!r}")
    return _dpmpp_multistep(_plain(denoise), x, sigmas, callback, order=2, midpoint=solver == "midpoint", eta=eta,
                            s_noise=s_noise, generator=generator)


@register("dpmpp_2m_sde_heun", nfe=1)
def sample_dpmpp_2m_sde_heun(denoise: Denoiser, x: Tensor, sigmas: Tensor, callback: StepCallback | None = None,
                             generator: Generator = None, eta: float = 1.0, s_noise: float = 1.0) -> Tensor:
    return sample_dpmpp_2m_sde(denoise, x, sigmas, callback, generator, eta, s_noise, solver="heun")


@register("dpmpp_3m_sde", nfe=1)
def sample_dpmpp_3m_sde(denoise: Denoiser, x: Tensor, sigmas: Tensor, callback: StepCallback | None = None,
                        generator: Generator = None, eta: float = 1.0, s_noise: float = 1.0) -> Tensor:
    """DPM-Solver++(3M) SDE; eta 0 is the DPM-Solver++(3M) ODE solver. Its second-difference term carries twice the
    phi_3 weight that k-diffusion and diffusers use: with theirs an x0_hat quadratic in lambda is not integrated
    exactly (local error O(h^3)) and the method measures second order on exact flows; with this weight it is exact
    for quadratics and measures third order (tests/test_samplers.py)."""
    return _dpmpp_multistep(_plain(denoise), x, sigmas, callback, order=3, eta=eta, s_noise=s_noise,
                            generator=generator)


@register("euler_cfg_pp", nfe=1, needs_uncond=True)
def sample_euler_cfg_pp(denoise: GuidedDenoiser, x: Tensor, sigmas: Tensor,
                        callback: StepCallback | None = None) -> Tensor:
    """CFG++ (Chung et al.) in flow form: x_s = (1 - s) x0_cfg + s eps_uncond, eps_uncond = (x - (1 - t) x0_uncond) / t.
    `cfg` is CFG++'s lambda (ComfyUI's convention; the paper uses 0..1, like CFG scales up to ~12.5).
    `denoise` must offer with_uncond(x, t) (guidance.GuidedDenoiser)."""
    return _dpmpp_multistep(_with_uncond(denoise, "euler_cfg_pp"), x, sigmas, callback, order=1)


@register("dpmpp_2m_cfg_pp", nfe=1, needs_uncond=True)
def sample_dpmpp_2m_cfg_pp(denoise: GuidedDenoiser, x: Tensor, sigmas: Tensor,
                           callback: StepCallback | None = None) -> Tensor:
    """DPM-Solver++(2M) with CFG++'s unconditional noise direction, in an exact flow form: its first-order part is
    euler_cfg_pp, its second-order term extrapolates the guided x0_hat; with cond == uncond it is dpmpp_2m.
    (ComfyUI's version renoises with the VE rule and so differs from flow CFG++ by s (x0_uncond - x0_cfg).)"""
    return _dpmpp_multistep(_with_uncond(denoise, "dpmpp_2m_cfg_pp"), x, sigmas, callback, order=2, midpoint=True)


# --- linear multistep in t: LMS, iPNDM, DEIS ----------------------------------------------------------------------

def _basis_integrals(nodes: Sequence[float], lo: float, hi: float, power: int) -> list[float]:
    """Integral over [lo, hi] of tau^power times each Lagrange basis polynomial on `nodes` (exact, float64)."""
    out = []
    for j, node in enumerate(nodes):
        others = [n for k, n in enumerate(nodes) if k != j]
        coef = np.polynomial.polynomial.polyfromroots(others) / np.prod([node - n for n in others])
        total = 0.0
        for k, c in enumerate(coef):  # c tau^(k + power)
            m = k + power
            total += c * (math.log(hi / lo) if m == -1 else (hi ** (m + 1) - lo ** (m + 1)) / (m + 1))
        out.append(total)
    return out


def _lagrange_at(nodes: Sequence[float], point: float) -> list[float]:
    return [math.prod((point - n) / (node - n) for k, n in enumerate(nodes) if k != j) for j, node in enumerate(nodes)]


@register("lms", nfe=1)
def sample_lms(denoise: Denoiser, x: Tensor, sigmas: Tensor, callback: StepCallback | None = None,
               order: int = 4) -> Tensor:
    """Linear multistep (variable-step Adams-Bashforth): integrates the polynomial through the last `order`
    velocities exactly."""
    ts = sigmas.tolist()
    velocities: list[Tensor] = []  # newest first
    for i in range(len(ts) - 1):
        x0 = denoise(x, sigmas[i])
        _report(callback, i, ts[i], x, x0)
        velocities = [(x - x0) / ts[i]] + velocities[:order - 1]
        weights = _basis_integrals(ts[i::-1][:len(velocities)], ts[i], ts[i + 1], 0)
        x = x + sum(w * v for w, v in zip(weights, velocities))
    return x


_ADAMS_BASHFORTH = ((1,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


@register("ipndm", nfe=1)
def sample_ipndm(denoise: Denoiser, x: Tensor, sigmas: Tensor, callback: StepCallback | None = None,
                 order: int = 4) -> Tensor:
    """iPNDM: Adams-Bashforth with the fixed equal-step weights (orders 1..4 while warming up). On an evenly spaced
    schedule (simple with shift 1) it is lms; on uneven steps the fixed weights leave it second order."""
    ts = sigmas.tolist()
    velocities: list[Tensor] = []
    for i in range(len(ts) - 1):
        x0 = denoise(x, sigmas[i])
        _report(callback, i, ts[i], x, x0)
        velocities = [(x - x0) / ts[i]] + velocities[:order - 1]
        weights = _ADAMS_BASHFORTH[len(velocities) - 1]
        x = x + (ts[i + 1] - ts[i]) * sum(w * v for w, v in zip(weights, velocities))
    return x


@register("deis", nfe=1)
def sample_deis(denoise: Denoiser, x: Tensor, sigmas: Tensor, callback: StepCallback | None = None,
                order: int = 3) -> Tensor:
    """DEIS (tAB) in data-prediction form: x_s / s = x_t / t + integral_s^t x0_hat(tau) / tau^2 dtau, with x0_hat the
    polynomial in t through the last `order` predictions, integrated exactly. The last step, s -> 0, is the limit
    x_0 = that polynomial at 0, so unlike the lambda solvers it keeps full order to the end."""
    ts = sigmas.tolist()
    preds: list[Tensor] = []
    for i in range(len(ts) - 1):
        t, s = ts[i], ts[i + 1]
        x0 = denoise(x, sigmas[i])
        _report(callback, i, t, x, x0)
        preds = [x0] + preds[:order - 1]
        nodes = ts[i::-1][:len(preds)]
        if s == 0:
            x = sum(w * p for w, p in zip(_lagrange_at(nodes, 0.0), preds))
        else:
            x = (s / t) * x + sum(s * w * p for w, p in zip(_basis_integrals(nodes, s, t, -2), preds))
    return x


# --- UniPC --------------------------------------------------------------------------------------------------------

def _unipc_update(x: Tensor, t: float, s: float, x0: Tensor, earlier: list[tuple[float, Tensor]], variant: str,
                  x0_next: Tensor | None = None) -> Tensor:
    """UniP (x0_next None) or UniC (x0_next = the prediction at the predicted point) from t to s, data prediction.
    `earlier`: (lambda, x0) of earlier steps, newest first; the order is len(earlier) + 1."""
    lam_t = _lam(t)
    h = _lam(s) - lam_t
    order = len(earlier) + 1
    rks = [(lam - lam_t) / h for lam, _ in earlier]
    diffs = [(p - x0) / r for r, (_, p) in zip(rks, earlier)]
    hh = -h
    h_phi_1 = math.expm1(hh)
    scale = hh if variant == "bh1" else h_phi_1  # B(h)
    # b_k = k! phi_{k+1}(hh) / B(h), built by the phi recursion; R_k = r^(k-1)
    b, h_phi_k, factorial = [], h_phi_1 / hh - 1, 1
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / scale)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    nodes = rks + [1.0]
    R = np.array([[r ** (k - 1) for r in nodes] for k in range(1, order + 1)])
    x_next = (s / t) * x - (1 - s) * h_phi_1 * x0
    if x0_next is None:
        if not diffs:
            return x_next
        rhos = [0.5] if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
        return x_next - (1 - s) * scale * sum(rho * d for rho, d in zip(rhos, diffs))
    rhos = [0.5] if order == 1 else np.linalg.solve(R, b).tolist()
    correction = sum(rho * d for rho, d in zip(rhos[:-1], diffs)) + rhos[-1] * (x0_next - x0)
    return x_next - (1 - s) * scale * correction


@register("uni_pc", nfe=1)
def sample_uni_pc(denoise: Denoiser, x: Tensor, sigmas: Tensor, callback: StepCallback | None = None,
                  order: int = 3, variant: str = "bh1") -> Tensor:
    """UniPC (Zhao et al.): a UniP predictor of `order`, corrected by UniC with the next step's evaluation (no extra
    NFE). Lower order while warming up and in the last steps, like diffusers' UniPCMultistepScheduler in flow mode.
    ComfyUI names: uni_pc (bh1), uni_pc_bh2; diffusers defaults to order 2, bh2."""
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"variant must be 'bh1' or 'bh2', got {variant!r}")
    ts = sigmas.tolist()
    steps = len(ts) - 1
    history: list[tuple[float, Tensor]] = []  # (lambda, x0) of earlier steps with finite lambda, newest first
    pending = None  # the last predictor step, for UniC: (x before it, t, s, x0, earlier)
    for i in range(steps):
        t, s = ts[i], ts[i + 1]
        x0 = denoise(x, sigmas[i])
        _report(callback, i, t, x, x0)
        if pending is not None:
            x = _unipc_update(*pending, variant, x0_next=x0)
        if s == 0:
            return x0
        if t >= 1:  # an infinite lambda step: first order, not corrected, nothing to remember
            x, pending, history = _euler(x, x0, t, s), None, []
            continue
        earlier = history[:min(order, steps - i) - 1]
        pending = (x, t, s, x0, earlier)
        x = _unipc_update(x, t, s, x0, earlier, variant)
        history = [(_lam(t), x0)] + history[:order - 1]
    return x


@register("uni_pc_bh2", nfe=1)
def sample_uni_pc_bh2(denoise: Denoiser, x: Tensor, sigmas: Tensor, callback: StepCallback | None = None,
                      order: int = 3) -> Tensor:
    return sample_uni_pc(denoise, x, sigmas, callback, order=order, variant="bh2")


# --- restart ------------------------------------------------------------------------------------------------------

def _karras_in_snr(t_hi: float, t_lo: float, steps: int, rho: float = 7.0) -> list[float]:
    """steps + 1 points from t_hi down to t_lo, Karras-spaced in the noise-to-signal ratio t / (1 - t) (= VE sigma)."""
    hi, lo = (t_hi / (1 - t_hi)) ** (1 / rho), (t_lo / (1 - t_lo)) ** (1 / rho)
    ratios = [(hi + k / steps * (lo - hi)) ** rho for k in range(steps + 1)]
    return [r / (1 + r) for r in ratios[:-1]] + [t_lo]


@register("restart", nfe=2)
def sample_restart(denoise: Denoiser, x: Tensor, sigmas: Tensor, callback: StepCallback | None = None,
                   generator: Generator = None, restart_range: tuple[float, float] = (0.0909, 0.667),
                   restart_steps: int | None = None, restart_times: int = 1) -> Tensor:
    """Restart (Xu et al.), as A1111 runs it, in flow form: Heun steps; on reaching the schedule point nearest
    t_min, renoise with the flow's forward rule up to t_max and integrate back down with `restart_steps` Heun steps
    (Karras-spaced in t / (1 - t)), `restart_times` times. The default range is A1111's VE sigmas [0.1, 2] mapped by
    t = sigma / (1 + sigma) (the same noise-to-signal ratio); restart_steps defaults to max(2, steps // 4).
    The restarts add 2 NFE per restart step; the callback counts them as further steps."""
    t_min, t_max = restart_range
    ts = sigmas.tolist()
    steps = len(ts) - 1
    bottom = min((j for j in range(1, steps + 1) if ts[j] > 0), key=lambda j: abs(ts[j] - t_min), default=None)
    restart = bottom is not None and ts[bottom] < t_max and restart_times > 0
    segment = _karras_in_snr(t_max, ts[bottom], restart_steps or max(2, steps // 4)) if restart else []
    counter = iter(range(10**9))
    report = lambda t, x_, x0: _report(callback, next(counter), t, x_, x0)
    for i in range(steps):
        x = _heun_step(denoise, x, ts[i], ts[i + 1], sigmas, report)
        if restart and i + 1 == bottom:
            for _ in range(restart_times):
                x = _renoise(x, ts[bottom], t_max, randn_like(x, generator))
                for t, s in zip(segment[:-1], segment[1:]):
                    x = _heun_step(denoise, x, t, s, sigmas, report)
    return x
