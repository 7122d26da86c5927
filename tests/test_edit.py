"""img2img, inpainting and outpainting on the tiny random pipeline: the start time, the per-step blend, the exact
composite, the outpainting mask, and clear errors for bad input."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from chromaflow.cli import main
from chromaflow.engine import sampling
from chromaflow.formats.png import read_png_settings
from chromaflow.models.vae import unpack
from chromaflow.pipeline import edit
from chromaflow.pipeline.loading import random_pipeline


@pytest.fixture(scope="module")
def pipe():
    return random_pipeline("tiny")


@pytest.fixture(scope="module")
def photo(pipe):
    return pipe("a red circle above a blue square", seed=11, progress=False).image


def pixels(image):
    return np.asarray(image, dtype=np.int16)


def model_inputs(pipe, **kw):
    """Run pipe(...) and record each transformer call's (packed image input, t)."""
    calls = []
    handle = pipe.transformer.register_forward_hook(lambda m, args, out: calls.append((args[0], float(args[4][0]))))
    try:
        out = pipe("a green triangle", seed=5, progress=False, **kw)
    finally:
        handle.remove()
    return out, calls


# --- img2img ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("strength", [0.3, 0.5, 0.75])
def test_strength_runs_the_last_steps_of_the_shifted_schedule(pipe, photo, strength):
    steps = 8
    out, calls = model_inputs(pipe, image=photo, strength=strength, steps=steps)
    full = sampling.schedule(steps, "simple", out.settings["shift"])
    ran = math.ceil(strength * steps)
    assert len(calls) == ran and out.settings["t_start"] == pytest.approx(float(full[steps - ran]), abs=1e-4)
    assert [t for _, t in calls] == pytest.approx(full[steps - ran:-1].tolist(), abs=1e-4)  # shift is rounded
    assert out.settings["t_start"] > strength  # the resolution shift puts the start above the strength


def test_start_time_with_flux_shift_at_1024_px():
    """The documented mapping: Flux's shift at 1024 px (mu 1.15), 28 steps."""
    sigmas = sampling.schedule(28, "simple", math.exp(sampling.flux_mu(4096)))
    assert [round(edit.start_time(s, sigmas), 3) for s in (0.3, 0.5, 0.75)] == [0.599, 0.76, 0.905]


def test_strength_zero_returns_the_vae_round_trip_and_one_ignores_the_input(pipe, photo):
    kept = pipe("anything", image=photo, strength=0.0, seed=3, progress=False)
    round_trip = pipe.decode(pipe.vae.encode(edit.prepare(photo).tensor()))
    assert kept.settings["t_start"] == 0 and np.array_equal(pixels(kept.image), pixels(round_trip[0]))
    ignored = pipe("anything", image=photo, strength=1.0, seed=3, progress=False)
    plain = pipe("anything", seed=3, progress=False)
    assert np.array_equal(pixels(ignored.image), pixels(plain.image))


def test_an_image_of_any_size_comes_back_at_its_size(pipe, photo):
    small = photo.crop((0, 0, 50, 40))
    with pytest.warns(UserWarning, match="edge-padded"):
        out = pipe("x", image=small, mask=np.ones((40, 50)), seed=0, progress=False)
    assert out.image.size == (50, 40) and "sampled as 64x48" in out.settings["adjustments"][0]
    with pytest.warns(UserWarning, match="resized"):
        resized = pipe("x", image=small, width=64, height=32, seed=0, progress=False)
    assert resized.image.size == (64, 32) and "resized" in resized.settings["adjustments"][0]


# --- inpainting -----------------------------------------------------------------------------------------------------

def square_mask(size=64, lo=16, hi=48, value=1.0):
    mask = np.zeros((size, size), np.float32)
    mask[lo:hi, lo:hi] = value
    return mask


def test_unmasked_pixels_are_kept_exactly_and_the_masked_ones_repainted(pipe, photo):
    out = pipe("a green triangle", image=photo, mask=square_mask(), seed=2, progress=False)
    before, after = pixels(photo), pixels(out.image)
    keep = square_mask() == 0
    assert np.array_equal(after[keep], before[keep])
    assert np.abs(after[~keep] - before[~keep]).mean() > 5


def test_known_latents_are_renoised_to_the_current_t_at_every_call(pipe, photo):
    """Inside the model's input the kept region is exactly t * noise + (1 - t) * known, and the final latents
    there are the known latents."""
    out, calls = model_inputs(pipe, image=photo, mask=square_mask(), steps=4)
    known = pipe.vae.encode(edit.prepare(photo).tensor())
    noise = pipe.initial_noise(5, 1, 64, 64)
    keep = edit.latent_mask(square_mask(), 8, "cpu") < 1  # latent pixels not fully inside the square
    for tokens, t in calls:
        torch.testing.assert_close(unpack(tokens, 8, 8)[keep.expand(1, 16, 8, 8)],
                                   (t * noise + (1 - t) * known)[keep.expand(1, 16, 8, 8)], atol=1e-5, rtol=0)
    assert torch.equal(out.latents[keep.expand(1, 16, 8, 8)], known[keep.expand(1, 16, 8, 8)])


def test_soft_mask_is_differential_diffusion(pipe, photo):
    """A latent pixel of mask value m is held to the input until t / t_start falls to m: at each step the clean
    estimate there is exactly the input's latents, and the model's own prediction once repainting."""
    soft = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (64, 1))  # 0 on the left, 1 on the right
    m = edit.latent_mask(edit._quantize(soft), 8, "cpu")[0, 0]
    known = pipe.vae.encode(edit.prepare(photo).tensor())[0]
    held = []

    def check(info):
        on_input = (info.x0[0] - known).abs().amax(0) == 0
        assert torch.equal(on_input, m < info.t / 1.0)  # t_start is 1 (a mask's default strength)
        held.append(int(on_input[0].sum()))

    out = pipe("a green triangle", image=photo, mask=soft, steps=6, seed=5, callback=check, progress=False)
    assert out.settings["t_start"] == 1.0 and len(held) == 6
    assert held == sorted(held, reverse=True) and held[0] == 8 and held[-1] <= 2  # columns join as t falls


def test_mask_blur_feathers_and_far_pixels_stay_exact(pipe, photo):
    out = pipe("a green triangle", image=photo, mask=square_mask(lo=24, hi=40), mask_blur=3, seed=2, progress=False)
    before, after = pixels(photo), pixels(out.image)
    far = np.ones((64, 64), bool)
    far[24 - 13:40 + 13, 24 - 13:40 + 13] = False  # beyond 4 sigma of the square, the blur's tail is cut
    assert np.array_equal(after[far], before[far])
    ring = np.zeros((64, 64), bool)
    ring[20:44, 20:44], ring[24:40, 24:40] = True, False
    assert np.abs(after[ring] - before[ring]).mean() > 0  # the feather repaints a little outside the square


def test_inpainting_works_with_cfg_pp_and_the_step_cache(pipe, photo):
    out = pipe("a", image=photo, mask=square_mask(), sampler="euler_cfg_pp", cfg=0.6, seed=1, progress=False)
    assert np.array_equal(pixels(out.image)[square_mask() == 0], pixels(photo)[square_mask() == 0])
    kw = dict(image=photo, mask=square_mask(), cfg=2.0, steps=4, seed=1, progress=False)
    cached = pipe("a", cache="fbc", cache_threshold=0.0, **kw)
    assert cached.settings["cache"]["full_passes"] == 4
    torch.testing.assert_close(cached.latents, pipe("a", **kw).latents, atol=1e-5, rtol=0)


# --- outpainting ----------------------------------------------------------------------------------------------------

def test_outpaint_mask_decays_with_distance_from_the_image():
    image = np.zeros((32, 32, 3), np.uint8)
    canvas = edit.prepare(image, outpaint=(32, 0, 0, 0), decay=0.5)
    assert (canvas.width, canvas.height) == (64, 32) and canvas.padding == (32, 0, 0, 0)
    row = canvas.sample_mask[10]
    d = np.arange(32, 0, -1)  # distance of padding column j from the image
    np.testing.assert_allclose(row[:32], 1 - np.exp(-d / (0.5 * 32)), atol=1 / 255)
    assert (canvas.sample_mask[:, 32:] == 0).all() and (canvas.keep[:, :32] == 0).all() \
        and (canvas.keep[:, 32:] == 1).all()
    feathered = edit.prepare(image, outpaint=(32, 0, 0, 0), mask_blur=2).keep
    assert (feathered[:, :32] == 0).all() and 0 < feathered[10, 32] < 1 and (feathered[:, 44:] == 1).all()
    sharper = edit.prepare(image, outpaint=(32, 0, 0, 0), decay=0.1).sample_mask[10, :32]
    assert (sharper >= row[:32]).all() and sharper[-1] > row[31]  # smaller k: less of the fill is kept


@pytest.mark.parametrize("fill", edit.FILLS)
def test_outpaint_keeps_the_image_and_generates_the_padding(pipe, photo, fill):
    out = pipe("a", image=photo, outpaint=(32, 16, 0, 0), outpaint_fill=fill, seed=4, progress=False)
    result = pixels(out.image)
    assert out.image.size == (96, 80) and out.settings["mode"] == "outpaint"
    assert np.array_equal(result[16:, 32:], pixels(photo))


def test_outpaint_padding_is_rounded_to_multiples_of_16_and_said(pipe, photo):
    with pytest.warns(UserWarning, match="rounded"):
        out = pipe("a", image=photo, outpaint=(10, 0, 3, 5), seed=4, progress=False)
    assert out.settings["outpaint"] == [13, 0, 3, 16] and out.image.size == (80, 80)
    assert "rounded to (13, 0, 3, 16)" in out.settings["adjustments"][0]


# --- bad input ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, match", [
    (dict(mask=np.ones((32, 64))), "mask is 64x32 but the image is 64x64"),
    (dict(mask=np.full((64, 64), 2.0)), r"values must be in \[0, 1\]"),
    (dict(strength=1.5), r"strength must be in \[0, 1\]"),
    (dict(strength=-0.1), r"strength must be in \[0, 1\]"),
    (dict(outpaint=(-8, 0, 0, 0)), "non-negative"),
    (dict(outpaint=(8, 0, 0, 0), outpaint_fill="wrap"), "valid: edge, reflect, gray"),
    (dict(outpaint=(8, 0, 0, 0), outpaint_decay=0), "outpaint_decay"),
    (dict(outpaint=(8, 0, 0, 0), width=64), "resize the image first"),
    (dict(mask_blur=-1, mask=np.ones((64, 64))), "mask_blur"),
    (dict(hires_scale=2), "hires fix upscales a text-to-image"),
])
def test_bad_edit_input_names_the_value(pipe, photo, kw, match):
    with pytest.raises(ValueError, match=match):
        pipe("a", image=photo, progress=False, **kw)


def test_a_mask_without_an_image_is_refused(pipe):
    with pytest.raises(ValueError, match="pass image="):
        pipe("a", mask=np.ones((64, 64)), progress=False)


# --- command line ---------------------------------------------------------------------------------------------------

def test_cli_inpaints_and_outpaints_with_settings_in_the_png(tmp_path, photo, capsys):
    photo.save(tmp_path / "in.png")
    Image.fromarray((square_mask() * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    out = tmp_path / "inpaint.png"
    assert main(["generate", "a star", "--model", "tiny", "--image", str(tmp_path / "in.png"), "--mask",
                 str(tmp_path / "mask.png"), "--mask-blur", "1", "--seed", "1", "--quiet", "-o", str(out)]) == 0
    settings = read_png_settings(out)
    assert settings["mode"] == "inpaint" and settings["strength"] == 1.0 and settings["mask_blur"] == 1.0
    out = tmp_path / "outpaint.png"
    assert main(["generate", "a star", "--model", "tiny", "--image", str(tmp_path / "in.png"), "--outpaint",
                 "16", "0", "16", "0", "--outpaint-fill", "reflect", "--quiet", "-o", str(out)]) == 0
    assert Image.open(out).size == (96, 64) and read_png_settings(out)["outpaint"] == [16, 0, 16, 0]


@pytest.mark.parametrize("extra, reason", [
    (["--strength", "2"], "strength must be in [0, 1]"),
    (["--mask", "MASK"], "mask is 32x32 but the image is 64x64"),
    (["--mask", "NOWHERE"], "NOWHERE"),
])
def test_cli_bad_edit_input_is_one_line(tmp_path, photo, capsys, extra, reason):
    photo.save(tmp_path / "in.png")
    Image.new("L", (32, 32), 255).save(tmp_path / "mask.png")
    extra = [str(tmp_path / "mask.png") if a == "MASK" else str(tmp_path / "none.png") if a == "NOWHERE" else a
             for a in extra]
    code = main(["generate", "x", "--model", "tiny", "--image", str(tmp_path / "in.png"), "--quiet",
                 "-o", str(tmp_path / "o.png"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and reason.replace("NOWHERE", "none.png") in err[-1] and "Traceback" not in "\n".join(err)
