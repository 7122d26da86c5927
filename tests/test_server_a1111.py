"""The A1111-compatible API driven by the published `webuiapi` client, unmodified, against a live server."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import numpy as np
import pytest
import webuiapi
from PIL import Image

from chromaflow.pipeline.loading import random_pipeline, save_folder
from test_server_support import running_server


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    base = tmp_path_factory.mktemp("a1111")
    save_folder(random_pipeline("tiny", seed=1), base / "models" / "checkpoints" / "other")
    with running_server(base) as (url, app):
        host, port = url.rsplit("//", 1)[1].split(":")
        yield webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler", steps=3), app


def test_txt2img_images_info_and_parameters(live):
    api, _ = live
    result = api.txt2img(prompt="a red circle", negative_prompt="blur", width=64, height=48 + 16, seed=7,
                         batch_size=2, cfg_scale=2.0, steps=3, sampler_name="DPM++ 2M Karras")
    assert len(result.images) == 2 and all(im.size == (64, 64) for im in result.images)
    assert np.asarray(result.images[0]).std() > 0  # a real decoded image, not a blank
    info = result.info
    assert info["all_seeds"] == [7, 8] and info["seed"] == 7 and len(info["infotexts"]) == 2
    assert info["sampler_name"] == "DPM++ 2M" and info["scheduler"] == "Karras"
    assert "Seed: 8" in info["infotexts"][1] and "Negative prompt: blur" in info["infotexts"][0]
    assert result.parameters["prompt"] == "a red circle"  # the request echoed
    assert "Steps: 3" in result.images[0].info["parameters"]  # the PNG carries the infotext
    parsed = api.png_info(result.images[1]).json
    assert parsed["parameters"]["Seed"] == "8" and parsed["parameters"]["Size-1"] == "64"
    assert parsed["parameters"]["Prompt"] == "a red circle"
    # same seed, same image: seeds are per image (seed + i)
    again = api.txt2img(prompt="a red circle", negative_prompt="blur", width=64, height=64, seed=8, cfg_scale=2.0,
                        steps=3, sampler_name="DPM++ 2M Karras")
    assert np.array_equal(np.asarray(again.image), np.asarray(result.images[1]))


def test_img2img_with_mask_keeps_unmasked_pixels(live):
    api, _ = live
    source = Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (64, 1, 3)))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # repaint the left half
    result = api.img2img(images=[source], mask_image=mask, mask_blur=0, prompt="x", width=64, height=64, seed=3,
                         denoising_strength=0.9, steps=3)
    out = np.asarray(result.image.convert("RGB")).astype(int)
    right = np.abs(out[:, 40:] - np.asarray(source)[:, 40:]).max()
    left = np.abs(out[:, :24] - np.asarray(source)[:, :24]).mean()
    assert right <= 2 < left  # the unmasked half is the input, the masked half was repainted
    assert result.info["denoising_strength"] == 0.9
    plain = api.img2img(images=[source], prompt="x", width=64, height=64, seed=3, denoising_strength=0.5, steps=3)
    assert plain.image.size == (64, 64)


def test_lists_options_and_model_switch(live):
    api, app = live
    assert "Euler a" in api.util_get_sampler_names() and "DPM++ 2M" in api.util_get_sampler_names()
    assert {"Karras", "Simple", "Automatic"} <= {s["label"] for s in api.get_schedulers()}
    names = [m["model_name"] for m in api.get_sd_models()]
    assert names[0] == "tiny" and "other" in names
    assert api.util_get_current_model().startswith("tiny")
    api.util_set_model("other")  # webuiapi POSTs {"sd_model_checkpoint": title} to /options
    assert api.util_get_current_model().startswith("other")
    result = api.txt2img(prompt="x", width=64, height=64, seed=1, steps=2)
    assert result.info["sd_model_name"] == "other"
    api.util_set_model("tiny")
    assert api.util_get_current_model().startswith("tiny")
    r = api.session.post(f"{api.baseurl}/options", json={"sd_model_checkpoint": "nope"})
    assert r.status_code == 422 and "unknown model 'nope'" in r.json()["detail"]


def test_progress_current_image_and_interrupt(live):
    api, _ = live
    idle = api.get_progress()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0  # util_wait_for_ready relies on this
    out = {}
    worker = threading.Thread(target=lambda: out.update(r=api.txt2img(prompt="long", width=64, height=64,
                                                                      steps=10000, seed=2)))
    worker.start()
    deadline, seen = time.time() + 60, None
    while time.time() < deadline:
        p = api.get_progress()
        if p["progress"] > 0 and p["current_image"]:
            seen = p
            break
        time.sleep(0.1)
    assert seen is not None, "no progress with a current image"
    assert seen["state"]["sampling_steps"] == 10000 and seen["state"]["job_count"] == 1
    assert Image.open(io.BytesIO(base64.b64decode(seen["current_image"]))).size == (64, 64)
    api.interrupt()
    worker.join(60)
    assert not worker.is_alive()
    result = out["r"]
    assert result.info["interrupted"] is True and result.image.size == (64, 64)  # A1111 returns the partial image
    api.util_wait_for_ready(check_interval=0.1)


def test_bad_requests_are_422_with_reasons(live):
    api, _ = live
    base = api.baseurl
    s = api.session
    r = s.post(f"{base}/txt2img", data=b"{not json")
    assert r.status_code == 422 and "not valid JSON" in r.json()["detail"]
    r = s.post(f"{base}/txt2img", json={"prompt": "x", "steps": "many"})
    assert r.status_code == 422 and "steps" in r.json()["detail"]
    r = s.post(f"{base}/txt2img", json={"prompt": "x", "width": 8192, "height": 8192})
    assert r.status_code == 422 and "--max-pixels" in r.json()["detail"]
    r = s.post(f"{base}/txt2img", json={"prompt": "x", "sampler_name": "Nope"})
    assert r.status_code == 422 and "unknown sampler" in r.json()["detail"]
    r = s.post(f"{base}/img2img", json={"prompt": "x", "init_images": ["bm90IGFuIGltYWdl"]})
    assert r.status_code == 422 and "init_images[0]" in r.json()["detail"]
    r = s.post(f"{base}/img2img", json={"prompt": "x"})
    assert r.status_code == 404 and "Init image not found" in r.json()["detail"]
    r = s.post(f"{base}/txt2img", json={"prompt": "x", "width": 64, "height": 64, "steps": 1, "unknown": {"a": 1}})
    assert r.status_code == 200 and json.loads(r.json()["info"])["steps"] == 1  # unknown fields ignored
