"""Guidance around a batched [cond; uncond] velocity: CFG, rescale, APG, CFG-Zero*, the guidance interval, and the
uncond pass skipped at cfg == 1."""

import pytest
import torch

from chromaflow.engine.guidance import Guidance, GuidedDenoiser


class FixedVelocity:
    """Rows [cond] -> v_c; rows [cond; uncond] -> [v_c; v_u]. Records each batch size."""

    def __init__(self, v_c, v_u):
        self.v_c, self.v_u, self.batches = v_c, v_u, []

    def __call__(self, x, t):
        self.batches.append(x.shape[0])
        return self.v_c if x.shape[0] == len(self.v_c) else torch.cat([self.v_c, self.v_u])


def per_sample(fn, a):
    return torch.stack([fn(row) for row in a])


@pytest.fixture
def case():
    g = torch.Generator().manual_seed(0)
    x, v_c, v_u = (torch.randn(3, 4, 5, generator=g, dtype=torch.float64) for _ in range(3))
    return x, torch.tensor(0.4, dtype=torch.float64), v_c, v_u


def guided(case, **options):
    x, t, v_c, v_u = case
    velocity = FixedVelocity(v_c, v_u)
    denoiser = GuidedDenoiser(velocity, Guidance(**options))
    return (x - denoiser(x, t)) / t, velocity.batches  # back to velocity


def test_cfg_combines_cond_and_uncond_in_one_batch_and_cfg_1_skips_uncond(case):
    _, _, v_c, v_u = case
    v, batches = guided(case, cfg=4.0)
    torch.testing.assert_close(v, v_u + 4.0 * (v_c - v_u))
    assert batches == [6]
    v, batches = guided(case, cfg=1.0, cfg_mode="apg", cfg_rescale=0.7)
    torch.testing.assert_close(v, v_c)
    assert batches == [3]


def test_rescale_matches_the_conditional_std_at_phi_1_and_blends_linearly(case):
    _, _, v_c, v_u = case
    plain, _ = guided(case, cfg=5.0)
    full, _ = guided(case, cfg=5.0, cfg_rescale=1.0)
    half, _ = guided(case, cfg=5.0, cfg_rescale=0.5)
    torch.testing.assert_close(per_sample(torch.std, full), per_sample(torch.std, v_c))
    torch.testing.assert_close(full / plain, (per_sample(torch.std, v_c) / per_sample(torch.std, plain))[:, None, None]
                               .expand_as(full))
    torch.testing.assert_close(half, (plain + full) / 2)


def test_apg_is_cfg_at_eta_1_and_otherwise_projects_and_clips(case):
    x, t, v_c, v_u = case
    cfg, _ = guided(case, cfg=3.0)
    apg, _ = guided(case, cfg=3.0, cfg_mode="apg")
    torch.testing.assert_close(apg, cfg)
    x0_c = x - t * v_c
    v, _ = guided(case, cfg=3.0, cfg_mode="apg", apg_eta=0.0)
    update = (x - t * v) - x0_c  # (w - 1) * the part of x0_c - x0_u orthogonal to x0_c
    assert torch.allclose((update * x0_c).flatten(1).sum(1), torch.zeros(3, dtype=torch.float64), atol=1e-9)
    v, _ = guided(case, cfg=3.0, cfg_mode="apg", apg_norm_threshold=0.1)
    norms = ((x - t * v) - x0_c).flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.full((3,), (3.0 - 1) * 0.1, dtype=torch.float64))


def test_apg_momentum_accumulates_within_a_run_and_resets_when_t_rises(case):
    x, _, v_c, v_u = case
    options = dict(cfg=2.0, cfg_mode="apg", apg_momentum=0.5)
    denoiser = GuidedDenoiser(FixedVelocity(v_c, v_u), Guidance(**options))
    at = lambda t: torch.tensor(t, dtype=torch.float64)
    first, second, restarted = (denoiser(x, at(t)) - (x - t * v_c) for t in (0.8, 0.8, 0.9))
    torch.testing.assert_close(second, 1.5 * first)  # running average d + 0.5 d
    fresh = GuidedDenoiser(FixedVelocity(v_c, v_u), Guidance(**options))(x, at(0.9)) - (x - 0.9 * v_c)
    torch.testing.assert_close(restarted, fresh)


def test_cfg_zero_star_drops_the_uncond_component_along_the_prediction(case):
    x, t, v_c, _ = case
    v, _ = guided((x, t, v_c, 0.5 * v_c), cfg=6.0, cfg_mode="cfg_zero_star")  # parallel: no guidance left
    torch.testing.assert_close(v, v_c)
    orthogonal = torch.randn_like(v_c)
    dot = lambda a, b: (a * b).flatten(1).sum(1)[:, None, None]
    orthogonal -= dot(orthogonal, v_c) / dot(v_c, v_c) * v_c
    v, _ = guided((x, t, v_c, orthogonal), cfg=6.0, cfg_mode="cfg_zero_star")  # alpha* = 0: the uncond term vanishes
    torch.testing.assert_close(v, 6.0 * v_c)


def test_guidance_interval_runs_one_conditional_pass_outside_it(case):
    x, _, v_c, v_u = case
    velocity = FixedVelocity(v_c, v_u)
    denoiser = GuidedDenoiser(velocity, Guidance(cfg=4.0, cfg_interval=(0.2, 0.6)))
    for t in (0.9, 0.6, 0.4, 0.2, 0.1):
        out = denoiser(x, torch.tensor(t, dtype=torch.float64))
        expected = v_c if not 0.2 <= t <= 0.6 else v_u + 4.0 * (v_c - v_u)
        torch.testing.assert_close((x - out) / t, expected)
    assert velocity.batches == [3, 6, 6, 6, 3]


def test_with_uncond_always_evaluates_the_unconditional_prediction(case):
    x, t, v_c, v_u = case
    velocity = FixedVelocity(v_c, v_u)
    x0, x0_u = GuidedDenoiser(velocity, Guidance(cfg=1.0)).with_uncond(x, t)
    torch.testing.assert_close(x0, x - t * v_c)
    torch.testing.assert_close(x0_u, x - t * v_u)
    assert velocity.batches == [6]


@pytest.mark.parametrize("options, match", [(dict(cfg_mode="pag"), "valid: cfg, apg, cfg_zero_star"),
                                            (dict(cfg_rescale=1.5), "cfg_rescale"), (dict(cfg=-1), "cfg"),
                                            (dict(cfg_interval=(0.8, 0.2)), "cfg_interval"),
                                            (dict(apg_momentum=1.0), "apg_momentum"),
                                            (dict(apg_norm_threshold=-1), "apg_norm_threshold")])
def test_bad_options_name_the_value(options, match):
    with pytest.raises(ValueError, match=match):
        Guidance(**options)


def test_changed_lists_only_non_default_options():
    assert Guidance(cfg=4.0).changed() == {}
    assert Guidance(cfg=4.0, cfg_mode="apg", cfg_interval=[0.1, 0.9]).changed() == {"cfg_mode": "apg",
                                                                                    "cfg_interval": (0.1, 0.9)}
