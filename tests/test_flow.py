"""Rectified-flow training math: timestep densities, OT pairing, targets."""

import math

import numpy as np
import pytest
import torch

from chromaflow.engine import flow


def draws(method, n=200_000, **kw):
    return flow.sample_timesteps(n, torch.Generator().manual_seed(0), method, **kw).double()


def test_chroma_density_matches_its_formula():
    t = draws("chroma")
    hist, edges = np.histogram(t.numpy(), bins=10, range=(0, 1), density=True)
    mid = (edges[:-1] + edges[1:]) / 2
    expected = (2 - 7.7 * (mid - 0.5) ** 2) / (2 - 7.7 / 12)  # normalised density
    np.testing.assert_allclose(hist, expected, rtol=0.04)
    assert t.min() >= 0 and t.max() <= 1 and (t < 0.02).any() and (t > 0.98).any()  # the tails are trained


def test_logit_normal_and_mode_and_uniform_have_their_moments():
    ln = draws("logit_normal", logit_mean=0.0, logit_std=1.0)
    assert abs(float(ln.mean()) - 0.5) < 0.01 and abs(float(torch.logit(ln).std()) - 1.0) < 0.01
    shifted = draws("logit_normal", logit_mean=1.0, logit_std=1.0)
    assert abs(float(torch.logit(shifted).mean()) - 1.0) < 0.01
    u = draws("uniform")
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.002
    mode = draws("mode", mode_scale=1.29)
    assert 0 <= mode.min() and mode.max() <= 1 and float(((mode > 0.3) & (mode < 0.7)).float().mean()) > 0.5


def test_shift_moves_timesteps_towards_noise():
    plain, shifted = draws("uniform"), draws("uniform", shift=3.0)
    assert float(shifted.mean()) > float(plain.mean()) + 0.1
    assert flow.resolution_shift("flux", 4096) == pytest.approx(math.exp(1.15))
    assert flow.resolution_shift(None, 4096) is None and flow.resolution_shift(2, 1) == 2.0


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="logit_normal"):
        flow.sample_timesteps(3, torch.Generator(), "lognorm")


def test_ot_pairing_maximises_total_cosine_similarity():
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(6, 4, 3, 3, generator=g), torch.randn(6, 4, 3, 3, generator=g)
    paired = flow.ot_pair(latents, noise)
    cos = lambda a, b: torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).sum()
    import itertools
    best = max(cos(latents, noise[list(p)]) for p in itertools.permutations(range(6)))
    assert torch.isclose(cos(latents, paired), best)
    assert sorted(map(tuple, paired.flatten(1).tolist())) == sorted(map(tuple, noise.flatten(1).tolist()))


def test_flow_pair_interpolates_and_targets_velocity():
    x0, eps, t = torch.randn(3, 5), torch.randn(3, 5), torch.tensor([0.0, 0.5, 1.0])
    x_t, v = flow.flow_pair(x0, eps, t)
    torch.testing.assert_close(x_t[0], x0[0])
    torch.testing.assert_close(x_t[2], eps[2])
    torch.testing.assert_close(v, eps - x0)
    torch.testing.assert_close(x_t[1] - 0.5 * v[1], x0[1])  # x0_hat = x_t - t v recovers the data
