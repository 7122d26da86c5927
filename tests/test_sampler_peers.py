"""Agreement with a peer: our Euler, DPM++ 2M and UniPC against diffusers' flow-mode schedulers on the same exact
denoiser and the same sigmas; our `simple` schedule against diffusers' Flux sigmas."""

import math

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from chromaflow.engine import sampling
from exact_flows import mixture

FLOW = mixture()


def velocity(x, t):
    return FLOW.velocity(x.double(), float(t)).to(x.dtype)


def run_diffusers(scheduler, steps, eps):
    """diffusers' own loop; returns the result and the sigmas it used (length steps + 1, ending at 0)."""
    scheduler.set_timesteps(steps)
    x = eps * scheduler.sigmas[0]
    for i, timestep in enumerate(scheduler.timesteps):
        x = scheduler.step(velocity(x, scheduler.sigmas[i]), timestep, x).prev_sample
    return x, scheduler.sigmas


flow_mode = dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0, final_sigmas_type="zero")
PEERS = [
    ("euler", {}, lambda: FlowMatchEulerDiscreteScheduler(shift=3.0)),
    ("dpmpp_2m", {}, lambda: DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
                                                         solver_type="midpoint", **flow_mode)),
    ("uni_pc_bh2", {"order": 2}, lambda: UniPCMultistepScheduler(solver_order=2, solver_type="bh2", **flow_mode)),
    ("uni_pc_bh2", {"order": 3}, lambda: UniPCMultistepScheduler(solver_order=3, solver_type="bh2", **flow_mode)),
]


@pytest.mark.parametrize("name, options, make", PEERS, ids=[f"{n}{o or ''}" for n, o, _ in PEERS])
@pytest.mark.parametrize("steps", [4, 10, 25])
def test_samplers_match_diffusers_flow_schedulers(name, options, make, steps):
    eps = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    theirs, sigmas = run_diffusers(make(), steps, eps)
    denoise = lambda x, t: x - t * velocity(x, t)
    ours = sampling.sample(name, denoise, eps * sigmas[0], sigmas, progress=False, **options)
    assert (ours - theirs).abs().max().item() < 1e-5


@pytest.mark.parametrize("steps", [4, 20, 28])
@pytest.mark.parametrize("tokens", [256, 1024, 4096])
def test_simple_schedule_is_diffusers_flux_schedule(steps, tokens):
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    mu = sampling.flux_mu(tokens)
    scheduler.set_timesteps(sigmas=torch.linspace(1, 1 / steps, steps).tolist(), mu=mu)
    torch.testing.assert_close(sampling.schedule(steps, "simple", math.exp(mu)), scheduler.sigmas, rtol=0, atol=1e-6)
