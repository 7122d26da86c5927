"""Every sampler, schedule and guidance option is reachable by the same names from pipe(...) and `chromaflow generate`;
ComfyUI and A1111 names select the same functions."""

import numpy as np
import pytest
import torch

from chromaflow.cli import main
from chromaflow.engine import sampling
from chromaflow.formats.png import read_png_settings
from chromaflow.pipeline.loading import random_pipeline


@pytest.fixture(scope="module")
def pipe():
    return random_pipeline("tiny")


def pixels(image):
    return torch.from_numpy(np.asarray(image).copy())


def forward_batches(pipe, **kw):
    batches = []
    handle = pipe.transformer.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    try:
        out = pipe("a red circle", seed=0, progress=False, **kw)
    finally:
        handle.remove()
    return batches, out


@pytest.mark.parametrize("name", sampling.SAMPLERS)
def test_every_sampler_runs_in_the_pipeline_and_reproduces(pipe, name):
    a = pipe("a red circle", seed=3, steps=3, cfg=0.8 if sampling.SAMPLERS[name].needs_uncond else 2.0,
             sampler=name, progress=False)
    b = pipe("a red circle", seed=3, steps=3, cfg=0.8 if sampling.SAMPLERS[name].needs_uncond else 2.0,
             sampler=name, progress=False)
    assert a.settings["sampler"] == name and a.image.size == (64, 64)
    assert pixels(a.image).equal(pixels(b.image))


@pytest.mark.parametrize("name", sampling.SCHEDULERS)
def test_every_schedule_runs_in_the_pipeline(pipe, name):
    out = pipe("a red circle", seed=3, steps=3, scheduler=name, progress=False)
    assert out.settings["scheduler"] == name


def test_a1111_and_comfyui_names_select_the_same_functions(pipe):
    same = lambda a, b: pixels(a.image).equal(pixels(b.image))
    ours = pipe("a", seed=1, steps=3, sampler="dpmpp_2m", scheduler="karras", progress=False)
    combined = pipe("a", seed=1, steps=3, sampler="DPM++ 2M Karras", progress=False)
    assert same(ours, combined) and (combined.settings["sampler"], combined.settings["scheduler"]) == ("dpmpp_2m",
                                                                                                       "karras")
    explicit = pipe("a", seed=1, steps=3, sampler="DPM++ 2M Karras", scheduler="Simple", progress=False)
    assert explicit.settings["scheduler"] == "simple"  # an explicit scheduler wins over the combined name's
    auto = pipe("a", seed=1, steps=3, sampler="Euler a", scheduler="Automatic", progress=False)
    assert (auto.settings["sampler"], auto.settings["scheduler"]) == ("euler_ancestral", "simple")
    assert same(auto, pipe("a", seed=1, steps=3, sampler="k_euler_a", progress=False))
    for label, name in sampling.A1111_SAMPLERS.items():
        assert sampling.resolve_sampler(label) == (name, None)
        assert sampling.resolve_sampler(label.upper() + " Exponential") == (name, "exponential")
    for label, name in sampling.A1111_SCHEDULERS.items():
        assert sampling.resolve_scheduler(label) == name
    with pytest.raises(ValueError, match="valid: euler, ddim, euler_ancestral"):
        sampling.resolve_sampler("DPM++ 9M")
    with pytest.raises(ValueError, match="valid: simple"):
        sampling.resolve_scheduler("Align Your Steps")


def test_stochastic_samplers_keep_image_i_reproducible_alone(pipe):
    batch = pipe("a red circle", seed=7, batch_size=3, steps=4, sampler="euler_ancestral", progress=False)
    alone = pipe("a red circle", seed=8, steps=4, sampler="euler_ancestral", progress=False)
    assert pixels(alone.image).equal(pixels(batch.images[1]))
    other = pipe("a red circle", seed=7, batch_size=3, steps=4, sampler="euler_ancestral",
                 sampler_options={"eta": 0.5}, progress=False)
    assert not pixels(other.images[0]).equal(pixels(batch.images[0]))
    assert other.settings["sampler_options"] == {"eta": 0.5}


def test_guidance_options_reach_the_denoiser(pipe):
    batches, out = forward_batches(pipe, steps=4, cfg=3.0, scheduler="normal", cfg_interval=(0.0, 0.5))
    assert batches == [1, 1, 2, 2]  # shift 1.58: t = 1, 0.76 lie outside the interval; 0.44, 0.002 inside
    assert out.settings["cfg_interval"] == (0.0, 0.5)
    batches, out = forward_batches(pipe, steps=2, cfg=1.0, sampler="euler_cfg_pp")
    assert batches == [2, 2]  # CFG++ needs the unconditional pass even at cfg 1
    _, apg = forward_batches(pipe, steps=2, cfg=3.0, cfg_mode="apg", apg_eta=0.0, apg_norm_threshold=2.0,
                             apg_momentum=-0.5, cfg_rescale=0.7)
    _, cfg = forward_batches(pipe, steps=2, cfg=3.0)
    assert apg.settings["cfg_mode"] == "apg" and apg.settings["apg_momentum"] == -0.5
    assert not pixels(apg.image).equal(pixels(cfg.image))
    with pytest.raises(ValueError, match="valid: cfg, apg"):
        pipe("a", steps=2, cfg_mode="sag", progress=False)
    with pytest.raises(ValueError, match="its options: eta, s_noise"):
        pipe("a", steps=2, sampler="euler_ancestral", sampler_options={"noise": 1}, progress=False)


def test_cli_generate_takes_every_option_by_the_same_names(tmp_path, capsys):
    out = tmp_path / "img.png"
    assert main(["generate", "a red circle", "-o", str(out), "--model", "tiny", "--seed", "5", "--steps", "3",
                 "--cfg", "2", "--sampler", "DPM++ 2M SDE Karras", "--cfg-mode", "apg", "--apg-eta", "0.5",
                 "--apg-norm-threshold", "3", "--apg-momentum", "-0.5", "--cfg-rescale", "0.7",
                 "--cfg-interval", "0.1", "0.9", "--sampler-option", "eta=0.5", "--sampler-option", "solver=heun",
                 "--quiet"]) == 0
    s = read_png_settings(out)
    assert (s["sampler"], s["scheduler"], s["cfg_mode"], s["apg_eta"], s["apg_norm_threshold"]) == \
        ("dpmpp_2m_sde", "karras", "apg", 0.5, 3.0)
    assert s["apg_momentum"] == -0.5 and s["cfg_rescale"] == 0.7 and s["cfg_interval"] == [0.1, 0.9]
    assert s["sampler_options"] == {"eta": 0.5, "solver": "heun"}
    capsys.readouterr()
    assert main(["generate", "x", "--model", "tiny", "--sampler", "nope", "-o", str(out)]) == 2
    assert "valid: euler" in capsys.readouterr().err
