"""VAE trainer: learns, writes a loadable normalised VAE, and resumes bit-identically from its checkpoint."""

import json
import os
import signal
from dataclasses import asdict

import pytest
import torch

from chromaflow.engine import train_vae as tv
from chromaflow.engine.shapes import ShapesDataset
from chromaflow.engine.train_vae import VAETrainConfig, measure_latent_stats, train_vae
from chromaflow.models.vae import VAE

TINY = dict(vae=dict(block_out_channels=(8, 8, 8, 8), norm_num_groups=4), image_size=32, scene_sizes=(32, 64),
            batch_size=4, steps=30, lr=2e-3, warmup=3, bf16=False, uniform_backgrounds=False, log_every=1,
            ckpt_every=10, eval_every=15, eval_images=2, stats_images=16, stats_size=32, final_images=2)


def _weights(vae: VAE) -> dict:
    return {k: v.clone() for k, v in vae.ae.state_dict().items()}


def _metrics(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny convs gain nothing from a second thread, and OpenMP threads spinning at barriers crawl when another
    # process holds a core (seconds per step); results are deterministic for a fixed thread count either way
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("vae")
    vae = train_vae(VAETrainConfig(**TINY), out, progress=False)
    return out, vae


def test_batches_are_deterministic_crops():
    cfg = VAETrainConfig(image_size=32, scene_sizes=(64, 128), batch_size=64)
    a, b = tv.make_batch(cfg, 7, ShapesDataset(0)), tv.make_batch(cfg, 7, ShapesDataset(0))
    assert a.shape == (64, 3, 32, 32) and torch.equal(a, b)
    assert not torch.equal(a, tv.make_batch(cfg, 8, ShapesDataset(0)))
    # object crops: almost every crop shows more than one colour (the background alone would be flat)
    assert sum(bool((img.flatten(1).std(1) > 0.05).any()) for img in a) >= 60
    # uniform backgrounds: the corner pixels of the 64 crops come in every background colour
    corners = {tuple(((img[:, 0, 0] + 1) * 127.5).round().int().tolist()) for img in a}
    assert {(245, 245, 240), (255, 255, 255), (20, 20, 20), (128, 128, 128)} <= corners


def test_loss_decreases_and_outputs_written(run):
    out, _ = run
    records = _metrics(out)
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:3]) / 3
    psnrs = [r["eval_psnr"] for r in records if "eval_psnr" in r]
    assert psnrs[-1] > psnrs[0]
    assert (out / "reconstructions.png").is_file() and (out / "state" / "trainer.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["parameters"] > 0 and summary["psnr_256"] > 0


def test_saved_vae_loads_with_measured_normalisation(run):
    out, vae = run
    loaded = VAE.load(out / "vae")
    summary = json.loads((out / "summary.json").read_text())
    assert loaded.shift_factor == pytest.approx(summary["latent_mean"])
    assert loaded.scaling_factor == pytest.approx(1 / summary["latent_std"])
    assert all(torch.equal(a, b) for a, b in zip(loaded.ae.state_dict().values(), vae.ae.state_dict().values()))
    # the normalised latents of the very images measured have zero mean and unit std
    data = ShapesDataset(TINY.get("seed", 0) + tv.EVAL_SEED_OFFSET, 32, as_tensor=True)
    z = torch.cat([loaded.encode(data[i][0][None]) for i in range(16)])
    assert z.mean().item() == pytest.approx(0, abs=1e-4)
    assert z.std(unbiased=False).item() == pytest.approx(1, abs=1e-4)
    mean, std = measure_latent_stats(loaded, data, 16)   # measures raw latents, whatever the normalisation
    assert (mean, std) == pytest.approx((summary["latent_mean"], summary["latent_std"]), rel=1e-5)


def test_resume_after_crash_is_bit_identical(run, tmp_path, monkeypatch):
    out, uninterrupted = run
    real_batch = tv.make_batch

    def crash_at_25(cfg, step, data):
        if step == 25:
            raise KeyboardInterrupt
        return real_batch(cfg, step, data)

    monkeypatch.setattr(tv, "make_batch", crash_at_25)
    with pytest.raises(KeyboardInterrupt):
        train_vae(VAETrainConfig(**TINY), tmp_path, progress=False)
    assert json.loads((tmp_path / "state" / "trainer.json").read_text())["step"] == 20
    assert not (tmp_path / "vae").exists()
    monkeypatch.setattr(tv, "make_batch", real_batch)
    resumed = train_vae(VAETrainConfig(**TINY), tmp_path, progress=False)
    a, b = _weights(uninterrupted), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the log is the uninterrupted one: records of the lost steps 21-25 were replaced, not duplicated
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("images_per_s", "elapsed_s")} for r in rs]  # noqa
    assert strip(_metrics(tmp_path)) == strip(_metrics(out))
    with pytest.raises(ValueError, match="lr"):   # a changed recipe cannot silently continue an old run
        train_vae(VAETrainConfig(**{**TINY, "lr": 1e-3}), tmp_path, progress=False)


def test_a_signal_saves_the_step_it_interrupts_and_the_run_resumes_bit_identically(run, tmp_path, monkeypatch):
    out, uninterrupted = run
    real_batch = tv.make_batch

    def ctrl_c_at_13(cfg, step, data):
        if step == 13:  # arrives mid-step, between checkpoints (every 10 steps)
            os.kill(os.getpid(), signal.SIGINT)
        return real_batch(cfg, step, data)

    monkeypatch.setattr(tv, "make_batch", ctrl_c_at_13)
    caller_handler = signal.getsignal(signal.SIGINT)  # SIG_IGN when the tests run as a background job
    with pytest.raises(KeyboardInterrupt):
        train_vae(VAETrainConfig(**TINY), tmp_path, progress=False)
    assert json.loads((tmp_path / "state" / "trainer.json").read_text())["step"] == 14  # nothing lost
    assert signal.getsignal(signal.SIGINT) is caller_handler  # the caller's Ctrl-C handling is back
    monkeypatch.setattr(tv, "make_batch", real_batch)
    resumed = train_vae(VAETrainConfig(**TINY), tmp_path, progress=False)
    a, b = _weights(uninterrupted), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_init_starts_from_a_vae_folder(run, tmp_path):
    out, vae = run
    start = train_vae(VAETrainConfig(**{**TINY, "steps": 0, "init": str(out / "vae")}), tmp_path, progress=False)
    a, b = _weights(vae), _weights(start)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_builtin_recipe_chains_its_stages(tmp_path, monkeypatch):
    first, second = tv.builtin_stages()
    assert second.init is None and first.steps + second.steps == 11000   # the shipped VAE's recipe
    tiny = lambda **kw: VAETrainConfig(**{**TINY, "steps": 4, **kw})  # noqa: E731
    monkeypatch.setattr(tv, "builtin_stages", lambda **vae: [tiny(), tiny(seed=1)])
    vae = tv.train_builtin_vae(tmp_path, progress=False)
    state = json.loads((tmp_path / "stage2" / "state" / "trainer.json").read_text())
    assert state["config"]["init"] == str(tmp_path / "stage1" / "vae")
    assert VAE.load(tmp_path / "stage2" / "vae").scaling_factor == pytest.approx(vae.scaling_factor)


def test_builtin_recipe_with_a_changed_architecture_keeps_the_rest():
    shipped, four = tv.builtin_stages(), tv.builtin_stages(latent_channels=4)
    for a, b in zip(shipped, four):
        assert b.vae_config()["latent_channels"] == 4 and a.vae_config()["latent_channels"] == 16
        assert {**a.vae, "latent_channels": 4} == b.vae and {**asdict(a), "vae": None} == {**asdict(b), "vae": None}


def test_recipe_vae_entry_names_the_builtin_recipe_or_one_stage():
    from chromaflow.pipeline.training import builtin_vae_overrides
    assert builtin_vae_overrides("builtin") == {}
    assert builtin_vae_overrides({"builtin": {"latent_channels": 4}}) == {"latent_channels": 4}
    assert builtin_vae_overrides({"steps": 4}) is None  # a single-stage VAETrainConfig
    for bad in ({"builtin": {"latent_chanels": 4}}, {"builtin": {}, "steps": 4}, {"builtin": 4}):
        with pytest.raises(ValueError, match="latent_channels"):  # the error lists the fields it takes
            builtin_vae_overrides(bad)


def test_crop_size_must_suit_the_vae_downsampling():
    five_levels = dict(block_out_channels=(8, 8, 8, 8, 8), layers_per_block=1, norm_num_groups=1)
    VAETrainConfig(vae=five_levels, image_size=96, scene_sizes=(128,))
    with pytest.raises(ValueError, match="multiple of 16"):
        VAETrainConfig(vae=five_levels, image_size=40, scene_sizes=(64,))
    VAETrainConfig(image_size=40, scene_sizes=(64,))  # 8x: 40 px crops are fine
