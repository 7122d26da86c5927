"""Schedules: the contract every one keeps, what each one's spacing law is, and how shifts apply on top."""

import math

import pytest
import torch

from chromaflow.engine import sampling
from chromaflow.engine.schedules import SHIFT_IGNORED, T_MIN


@pytest.mark.parametrize("name", sampling.SCHEDULERS)
@pytest.mark.parametrize("steps", [1, 2, 7, 30])
@pytest.mark.parametrize("shift", [1.0, 3.16])
def test_every_schedule_descends_from_at_most_one_to_zero(name, steps, shift):
    t = sampling.schedule(steps, name, shift)
    assert t.dtype == torch.float32 and t.shape == (steps + 1,)
    assert t[-1] == 0 and t[0] <= 1 and torch.all(t[1:] < t[:-1])
    if name != "ddim_uniform":  # DDIM's strides start one stride below the top of the table
        assert t[0] == 1


@pytest.mark.parametrize("name", [n for n in sampling.SCHEDULERS if n not in SHIFT_IGNORED])
def test_the_shift_applies_on_top_of_the_unshifted_schedule(name):
    plain = sampling.schedule(12, name, 1.0).double()
    torch.testing.assert_close(sampling.schedule(12, name, 3.0).double(), sampling.shift_time(plain, 3.0),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", SHIFT_IGNORED)
def test_endpoint_schedules_ignore_the_shift_but_for_their_lowest_point(name):
    for shift in (1.0, 3.0):
        t = sampling.schedule(12, name, shift).double()
        assert t[0] == 1 and t[-2].item() == pytest.approx(shift * T_MIN / (1 + (shift - 1) * T_MIN), rel=1e-6)


def test_spacing_laws():
    n = 9
    simple = sampling.schedule(n, "simple", 1.0).double()
    torch.testing.assert_close(simple[:-1], torch.linspace(1, 1 / n, n, dtype=torch.float64))
    assert sampling.schedule(n, "normal", 1.0)[-2].item() == pytest.approx(T_MIN)
    karras = sampling.schedule(n, "karras", 1.0).double()[:-1]
    assert torch.allclose(karras.pow(1 / 7).diff(), karras.pow(1 / 7).diff()[0])  # linear in t^(1/rho)
    exponential = sampling.schedule(n, "exponential", 1.0).double()[:-1]
    assert torch.allclose(exponential.log().diff(), exponential.log().diff()[0])
    kl = sampling.schedule(n, "kl_optimal", 1.0).double()[:-1]
    assert torch.allclose(kl.atan().diff(), kl.atan().diff()[0], atol=1e-6)
    ddim = sampling.schedule(4, "ddim_uniform", 1.0).double()[:-1]  # table entries 1, 251, 501, 751 (t = (i+1)/1000)
    torch.testing.assert_close(ddim, torch.tensor([0.752, 0.502, 0.252, 0.002], dtype=torch.float64))
    beta = sampling.schedule(n, "beta", 1.0).double()
    gaps = -beta[:-1].diff()  # Beta(0.6, 0.6) quantiles: dense at both ends, wide in the middle
    assert gaps[0] < gaps[n // 2] and gaps[-1] < gaps[n // 2]


def test_flux_dynamic_shift_from_the_token_count():
    # 1024x1024 Flux latents: 128x128, packed 2x2 -> 4096 tokens -> mu 1.15; 512x512 -> 1024 tokens -> mu 0.63
    assert sampling.resolve_shift(None, 4096) == pytest.approx(math.exp(1.15))
    assert sampling.resolve_shift(None, 1024) == pytest.approx(math.exp(0.63))
    assert sampling.resolve_shift(2.0, 4096) == 2.0
    t = torch.tensor([0.3, 0.7], dtype=torch.float64)
    mu = sampling.flux_mu(1024)  # Flux's time_shift(mu, 1, t) = e^mu / (e^mu + 1/t - 1)
    torch.testing.assert_close(sampling.shift_time(t, math.exp(mu)), math.exp(mu) / (math.exp(mu) + 1 / t - 1))


def test_unknown_schedule_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid: simple, normal, sgm_uniform"):
        sampling.schedule(4, "karas")
    with pytest.raises(ValueError, match="steps"):
        sampling.schedule(0, "simple")
