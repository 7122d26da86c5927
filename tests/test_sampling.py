"""First-cut sampling: Flux shift schedule, Euler, CFG batching."""

import math

import pytest
import torch

from chromaflow.engine import sampling


def test_flux_mu_matches_reference_points():
    assert sampling.flux_mu(256) == pytest.approx(0.5)
    assert sampling.flux_mu(4096) == pytest.approx(1.15)
    assert sampling.flux_mu(1024) == pytest.approx(0.63)


def test_shift_equals_flux_time_shift_with_alpha_exp_mu():
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    mu = 0.9
    flux = math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    torch.testing.assert_close(sampling.shift_time(t, math.exp(mu)), flux)


def test_schedule_runs_from_one_to_zero_and_shift_moves_it_towards_noise():
    plain = sampling.schedule(10, "simple", 1.0)
    shifted = sampling.schedule(10, "simple", 3.0)
    assert len(plain) == 11 and plain[0] == 1 and plain[-1] == 0
    assert torch.all(plain[1:] < plain[:-1])
    assert torch.all(shifted[1:-1] > plain[1:-1])


def test_resolve_shift_is_fixed_or_dynamic():
    assert sampling.resolve_shift(3.0, 10_000) == 3.0
    assert sampling.resolve_shift(None, 4096) == pytest.approx(math.exp(1.15))


def test_euler_is_exact_when_the_denoiser_knows_the_data():
    target = torch.randn(2, 5, 4)
    x = sampling.sample("euler", lambda x, t: target, torch.randn(2, 5, 4), sampling.schedule(7, shift=2.0),
                        progress=False)
    torch.testing.assert_close(x, target)


def test_euler_follows_a_straight_flow():
    # x_t = (1 - t) x0 + t eps has constant velocity eps - x0: any schedule lands on x0 from eps
    x0, eps = torch.randn(3, 8), torch.randn(3, 8)
    denoise = lambda x, t: x - t * (eps - x0)  # exact x0_hat for this single-pair flow
    out = sampling.sample_euler(denoise, eps.clone(), sampling.schedule(3, shift=1.0))
    torch.testing.assert_close(out, x0)


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="valid: euler"):
        sampling.sample("eulr", lambda x, t: x, torch.zeros(1), sampling.schedule(2))
    with pytest.raises(ValueError, match="simple"):
        sampling.schedule(4, "karass")


def test_cfg_mixes_cond_and_uncond_in_one_batch():
    calls = []

    def velocity(x, t):
        calls.append(x.shape[0])
        v = torch.full_like(x, 2.0)  # rows 0..2 are cond; any further rows are uncond
        v[3:] = 0.5
        return v

    x, t = torch.ones(3, 4), torch.tensor(0.5)
    out = sampling.cfg_denoiser(velocity, 4.0)(x, t)
    torch.testing.assert_close(out, x - 0.5 * (0.5 + 4.0 * (2.0 - 0.5)))
    assert calls == [6]
    calls.clear()
    out = sampling.cfg_denoiser(velocity, 1.0)(x, t)
    torch.testing.assert_close(out, x - 0.5 * 2.0)
    assert calls == [3]  # cfg == 1: no unconditional pass
