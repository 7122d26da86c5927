"""Samplers proven on exact flows: convergence order of every deterministic sampler, identities between them,
exactness on a point mass, reproducible noise, CFG++ in flow form, options and callbacks.

The exact model is tests/exact_flows.py (Gaussian and Gaussian-mixture data, closed-form x0_hat). The marginal
(distribution) tests of the stochastic samplers are in test_sampler_marginals.py.
"""

import math

import numpy as np
import pytest
import torch

from chromaflow.engine import sampling
from chromaflow.engine.guidance import Guidance, GuidedDenoiser
from exact_flows import GaussianMixtureFlow, gaussian, mixture

DETERMINISTIC = [name for name, fn in sampling.SAMPLERS.items() if not fn.stochastic and not fn.needs_uncond]
STOCHASTIC = [name for name, fn in sampling.SAMPLERS.items() if fn.stochastic]


def cosine_grid(steps):
    """t_i = cos^2(pi i / 2N): steps shrink like 1/N^2 at both ends. Multistep methods warm up with first-order
    steps and the lambda solvers end with x0_hat (first order); their O(h^2) local errors would cap every global
    order at 2 on a grid whose end steps are O(1/N). Here those errors are O(1/N^4), so each method shows its own
    order."""
    t = torch.cos(torch.linspace(0, 1, steps + 1, dtype=torch.float64) * math.pi / 2) ** 2
    t[-1] = 0
    return t


@pytest.fixture(scope="module", params=["gaussian", "mixture"])
def problem(request):
    flow = gaussian() if request.param == "gaussian" else mixture()
    eps = torch.randn(64, flow.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return flow, eps, flow.ode_solution(eps)


def rms(a, b):
    return (a - b).pow(2).mean().sqrt().item()


# (sampler, options, theoretical order). uni_pc of order p with its corrector is order p + 1; ipndm's fixed
# equal-step weights make it second order on an uneven grid; dpmpp_3m_sde (eta 0) is the 3M ODE solver.
ORDERS = [("euler", {}, 1), ("ddim", {}, 1), ("heun", {}, 2), ("dpm_2", {}, 2), ("dpmpp_2m", {}, 2),
          ("res_multistep", {}, 2), ("dpmpp_2m_sde", {"eta": 0.0}, 2), ("dpmpp_2m_sde_heun", {"eta": 0.0}, 2),
          ("dpmpp_3m_sde", {"eta": 0.0}, 3), ("lms", {}, 4), ("ipndm", {}, 2), ("deis", {}, 3),
          ("uni_pc", {}, 4), ("uni_pc_bh2", {}, 4), ("uni_pc_bh2", {"order": 2}, 3)]
STEPS = (32, 64, 128, 256)


@pytest.mark.parametrize("name, options, order", ORDERS, ids=[f"{n}{o or ''}" for n, o, _ in ORDERS])
def test_deterministic_samplers_converge_to_the_exact_ode_solution_with_their_order(problem, name, options, order):
    flow, eps, exact = problem
    errors = [rms(sampling.sample(name, flow.denoise, eps, cosine_grid(n), progress=False, **options), exact)
              for n in STEPS]
    fitted = -np.polyfit(np.log(STEPS), np.log(errors), 1)[0]
    assert abs(fitted - order) < 0.4, (name, fitted, errors)


def test_every_deterministic_sampler_is_in_the_order_table():
    assert set(DETERMINISTIC) <= {name for name, _, _ in ORDERS}


@pytest.mark.parametrize("scheduler", sampling.SCHEDULERS)
def test_every_sampler_converges_on_every_schedule(scheduler):
    flow = mixture()
    eps = torch.randn(16, flow.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sigmas = {n: sampling.schedule(n, scheduler, 3.0).double() for n in (16, 64)}
    exact = {n: flow.ode_solution(eps * s[0], t_start=float(s[0])) for n, s in sigmas.items()}
    for name in DETERMINISTIC:
        errors = [rms(sampling.sample(name, flow.denoise, eps * s[0], s, progress=False), exact[n])
                  for n, s in sigmas.items()]
        assert errors[1] < errors[0] / 2, (name, errors)


def test_aliases_and_special_cases_are_the_same_update():
    flow, sigmas = mixture(), sampling.schedule(12, "simple", 3.0).double()
    eps = torch.randn(8, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    run = lambda name, **kw: sampling.sample(name, flow.denoise, eps, sigmas, progress=False, **kw)
    torch.testing.assert_close(run("ddim"), run("euler"))  # DDIM (eta 0) is Euler for flow
    torch.testing.assert_close(run("dpmpp_2m_sde", eta=0.0), run("dpmpp_2m"))
    torch.testing.assert_close(run("dpmpp_2m_sde_heun", eta=0.0), run("res_multistep"))
    torch.testing.assert_close(run("euler_ancestral", eta=0.0), run("euler"))
    torch.testing.assert_close(run("dpm_2_ancestral", eta=0.0), run("dpm_2"))
    torch.testing.assert_close(run("restart", restart_times=0), run("heun"))
    even = sampling.schedule(12, "simple", 1.0).double()  # equal steps: iPNDM's fixed weights are LMS's weights
    torch.testing.assert_close(sampling.sample("ipndm", flow.denoise, eps, even, progress=False),
                               sampling.sample("lms", flow.denoise, eps, even, progress=False))


@pytest.mark.parametrize("name", [n for n in sampling.SAMPLERS if not sampling.SAMPLERS[n].needs_uncond])
def test_every_sampler_lands_on_a_point_mass(name):
    # data = one point: x0_hat is that point everywhere and every trajectory is straight, so all samplers are exact
    target = torch.randn(3, 4, dtype=torch.float64)
    x = sampling.sample(name, lambda x, t: target.expand_as(x), torch.randn(3, 4, dtype=torch.float64),
                        sampling.schedule(5, "simple", 2.0).double(), progress=False,
                        generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x, target)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_samplers_reproduce_from_cpu_generators_row_by_row(name):
    flow, sigmas = mixture(), sampling.schedule(6, "simple", 2.0).double()
    eps = torch.randn(3, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    rows = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    run = lambda x, generator: sampling.sample(name, flow.denoise, x, sigmas, progress=False, generator=generator)
    batch = run(eps, rows([10, 11, 12]))
    torch.testing.assert_close(run(eps, rows([10, 11, 12])), batch)
    torch.testing.assert_close(run(eps[1:2], rows([11])), batch[1:2])  # row 1 alone, from its own generator
    assert not torch.allclose(run(eps, rows([20, 21, 22])), batch)


def test_nfe_per_step_is_what_the_sampler_spends():
    flow, steps = mixture(), 10
    sigmas = sampling.schedule(steps, "ddim_uniform", 1.0).double()
    for name, fn in sampling.SAMPLERS.items():
        if fn.needs_uncond:
            continue
        calls = []
        counted = lambda x, t: calls.append(t) or flow.denoise(x, t)
        sampling.sample(name, counted, torch.zeros(2, 2, dtype=torch.float64), sigmas, progress=False,
                        generator=torch.Generator().manual_seed(0),
                        **({"restart_times": 0} if name == "restart" else {}))
        assert len(calls) == fn.nfe * (steps - 1) + 1, name  # the last step, to t = 0, takes one evaluation


def test_restart_renoises_at_t_min_and_integrates_down_from_t_max():
    flow, sigmas = mixture(), sampling.schedule(10, "simple", 1.0).double()  # 1, 0.9, ..., 0.1, 0
    seen = []
    sampling.sample("restart", flow.denoise, torch.zeros(2, 2, dtype=torch.float64), sigmas, progress=False,
                    callback=lambda i, t, x, x0: seen.append((i, t)), generator=torch.Generator().manual_seed(0),
                    restart_steps=3, restart_times=2)
    # the 9 steps down to t = 0.1 (nearest 0.0909), then twice 3 steps from t = 0.667 down to 0.1, then the last step
    assert [i for i, _ in seen] == list(range(16))
    ts = [round(t, 4) for _, t in seen]
    assert ts[:9] == [round(t, 4) for t in sigmas[:9].tolist()] and ts[15] == 0.1
    assert ts[9] == ts[12] == 0.667 and ts[9] > ts[10] > ts[11] > 0.1


def test_callback_sees_every_step_in_order():
    flow, sigmas = mixture(), sampling.schedule(7, "karras", 1.0).double()
    for name, fn in sampling.SAMPLERS.items():
        if fn.needs_uncond or name == "restart":
            continue
        seen = []
        sampling.sample(name, flow.denoise, torch.zeros(1, 2, dtype=torch.float64), sigmas, progress=False,
                        callback=lambda i, t, x, x0: seen.append((i, t)), generator=torch.Generator().manual_seed(0))
        assert seen == list(enumerate(sigmas[:-1].tolist())), name


# --- CFG++ ----------------------------------------------------------------------------------------------------

def two_flows(batch):
    """cond and uncond as two different exact flows; velocity rows are [cond] or [cond; uncond] as in the pipeline."""
    cond = GaussianMixtureFlow([1.0], [[1.0, -0.5]], [[0.3, 0.6]])
    uncond = GaussianMixtureFlow([0.5, 0.5], [[-1.0, 0.0], [0.5, 1.0]], [[0.4, 0.4], [0.2, 0.5]])
    calls = []

    def velocity(x, t):
        calls.append(x.shape[0])
        return torch.cat([cond.velocity(x[:batch], t), uncond.velocity(x[batch:], t)])

    return cond, uncond, velocity, calls


def test_cfg_pp_is_exact_flow_cfg_pp_and_reduces_to_its_base_without_guidance():
    cond, uncond, velocity, _ = two_flows(4)
    eps = torch.randn(4, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    sigmas = sampling.schedule(8, "simple", 2.0).double()
    lam = 0.6
    guided = GuidedDenoiser(velocity, Guidance(cfg=lam))
    # one step by hand: x_s = (1 - s) x0_cfg + s eps_uncond, eps_uncond = (x - (1 - t) x0_uncond) / t
    t, s = float(sigmas[1]), float(sigmas[2])
    x = eps * 0.7
    x0_c, x0_u = cond.denoise(x, t), uncond.denoise(x, t)
    x0_cfg = x0_u + lam * (x0_c - x0_u)
    by_hand = (1 - s) * x0_cfg + s * (x - (1 - t) * x0_u) / t
    torch.testing.assert_close(sampling.sample("euler_cfg_pp", guided, x, sigmas[1:3], progress=False), by_hand)
    # the 2M variant's first step is the same; with cond == uncond both are their base samplers
    torch.testing.assert_close(sampling.sample("dpmpp_2m_cfg_pp", guided, x, sigmas[1:3], progress=False), by_hand)
    same = GuidedDenoiser(cond.velocity, Guidance(cfg=lam))
    for cfg_pp, base in (("euler_cfg_pp", "euler"), ("dpmpp_2m_cfg_pp", "dpmpp_2m")):
        torch.testing.assert_close(sampling.sample(cfg_pp, same, eps, sigmas, progress=False),
                                   sampling.sample(base, cond.denoise, eps, sigmas, progress=False))


def test_cfg_pp_runs_the_unconditional_pass_even_at_cfg_1_and_needs_a_guided_denoiser():
    _, _, velocity, calls = two_flows(4)
    sigmas = sampling.schedule(3, "simple", 1.0).double()
    sampling.sample("euler_cfg_pp", GuidedDenoiser(velocity, Guidance(cfg=1.0)), torch.zeros(4, 2, dtype=torch.float64),
                    sigmas, progress=False)
    assert calls == [8, 8, 8]
    with pytest.raises(TypeError, match="GuidedDenoiser"):
        sampling.sample("dpmpp_2m_cfg_pp", lambda x, t: x, torch.zeros(1, 2), sigmas, progress=False)


# --- options ----------------------------------------------------------------------------------------------------

def test_sampler_options_are_checked_by_name():
    sigmas = sampling.schedule(3)
    with pytest.raises(ValueError, match="its options: eta, s_noise"):
        sampling.sample("euler_ancestral", lambda x, t: x, torch.zeros(1, 2), sigmas, progress=False, etta=0.5)
    with pytest.raises(ValueError, match="eta must be in"):
        sampling.sample("euler_ancestral", lambda x, t: x, torch.zeros(1, 2), sigmas, progress=False, eta=1.5)
    with pytest.raises(ValueError, match="bh1"):
        sampling.sample("uni_pc", lambda x, t: x, torch.zeros(1, 2), sigmas, progress=False, variant="bh3")
    assert sampling.sampler_options("dpmpp_3m_sde") == ["eta", "s_noise"]
    assert sampling.sampler_options("euler") == []
