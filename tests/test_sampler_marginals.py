"""Stochastic samplers produce the right distribution: on exact flows (tests/exact_flows.py) the mean and covariance of
many samples match the data's within statistical tolerance. A VE noise rule misapplied to flow fails the same check.
"""

import math

import pytest
import torch

from chromaflow.engine import sampling
from exact_flows import consistency_function, gaussian, mixture

N_SAMPLES = 10_000
Z = 4.0  # tolerance in standard errors, per entry
STEPS = {"euler_ancestral": 800}  # first order in distribution: at 100 steps its bias (~0.06) is 3x the noise
DEFAULT_STEPS = 100


def moment_errors(flow, x):
    """(|mean error|, |cov error|) divided by their standard errors (estimated on exact data samples)."""
    data = flow.sample_data(N_SAMPLES, torch.Generator().manual_seed(99))
    mean, cov = flow.mean(), flow.cov()
    centred = data - mean
    products = centred[:, :, None] * centred[:, None, :]
    se_mean = data.std(0) / math.sqrt(N_SAMPLES)
    se_cov = products.flatten(1).std(0).view_as(cov) / math.sqrt(N_SAMPLES)
    return ((x.mean(0) - mean).abs() / se_mean).max().item(), ((torch.cov(x.T) - cov).abs() / se_cov).max().item()


def draw(flow, name, steps, **options):
    eps = torch.randn(N_SAMPLES, flow.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sigmas = sampling.schedule(steps, "simple", 1.0).double()
    return sampling.sample(name, flow.denoise, eps, sigmas, progress=False,
                           generator=torch.Generator().manual_seed(2), **options)


@pytest.fixture(scope="module", params=["gaussian", "mixture"])
def flow(request):
    return gaussian() if request.param == "gaussian" else mixture()


@pytest.mark.parametrize("name", [n for n, fn in sampling.SAMPLERS.items() if fn.stochastic and n != "lcm"])
def test_stochastic_samplers_sample_the_data_distribution(flow, name):
    x = draw(flow, name, STEPS.get(name, DEFAULT_STEPS))
    mean_z, cov_z = moment_errors(flow, x)
    assert mean_z < Z and cov_z < Z, (name, mean_z, cov_z)


def test_the_check_catches_a_ve_noise_rule_applied_to_flow(flow):
    # k-diffusion's VE ancestral step adds noise without shrinking the signal; on a flow model that is wrong
    def ve_euler_ancestral(denoise, x, sigmas, callback=None, generator=None):
        ts = sigmas.tolist()
        for i in range(len(ts) - 1):
            t, s = ts[i], ts[i + 1]
            x0 = denoise(x, sigmas[i])
            up = min(s, math.sqrt(s * s * (t * t - s * s) / (t * t)))
            down = math.sqrt(s * s - up * up)
            x = x + (down - t) * (x - x0) / t + up * sampling.randn_like(x, generator)
        return x

    ve_euler_ancestral.nfe, ve_euler_ancestral.needs_uncond, ve_euler_ancestral.stochastic = 1, False, True
    sampling.SAMPLERS["ve_euler_ancestral"] = ve_euler_ancestral
    try:
        mean_z, cov_z = moment_errors(flow, draw(flow, "ve_euler_ancestral", DEFAULT_STEPS))
    finally:
        del sampling.SAMPLERS["ve_euler_ancestral"]
    assert cov_z > 5 * Z, cov_z


def test_lcm_samples_exactly_with_a_consistency_model():
    # LCM's step assumes the model returns a sample of x0 (a consistency model), not its mean: with the exact
    # consistency function of a Gaussian, any number of steps gives the exact distribution
    flow = gaussian()
    eps = torch.randn(N_SAMPLES, flow.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for steps in (1, 4):
        x = sampling.sample("lcm", lambda x, t: consistency_function(flow, x, t), eps,
                            sampling.schedule(steps, "simple", 3.0).double(), progress=False,
                            generator=torch.Generator().manual_seed(2))
        mean_z, cov_z = moment_errors(flow, x)
        assert mean_z < Z and cov_z < Z, (steps, mean_z, cov_z)
