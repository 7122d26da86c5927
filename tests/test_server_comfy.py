"""The ComfyUI-compatible API driven by the published `comfy-api-simplified` client, unmodified, plus the raw
websocket protocol, the queue, interrupt, file safety, auth and the node registry, against a live server."""

from __future__ import annotations

import io
import json
import os
import time

import httpx
import numpy as np
import pytest
from comfy_api_simplified import ComfyApiWrapper, ComfyWorkflowWrapper
from PIL import Image
from websockets.sync.client import connect

from chromaflow.server import ServerConfig, create_app
from chromaflow.server.nodes import NODES
from test_server_support import running_server

CORE = ["UNETLoader", "CLIPLoader", "VAELoader", "CLIPTextEncode", "T5TokenizerOptions", "EmptySD3LatentImage",
        "EmptyLatentImage", "KSampler", "KSamplerAdvanced", "ModelSamplingFlux", "ModelSamplingSD3", "CFGGuider",
        "BasicScheduler", "KSamplerSelect", "RandomNoise", "SamplerCustomAdvanced", "VAEDecode", "VAEEncode",
        "SetLatentNoiseMask", "LoadImage", "SaveImage", "PreviewImage", "ImageScale", "LoraLoaderModelOnly"]


def graph(text="a red circle", steps=3, seed=1, size=64, batch=1, latent=None):
    """A Chroma text-to-image graph in API format, with the titles comfy-api-simplified addresses nodes by."""
    node = lambda cls, title, **inputs: {"class_type": cls, "inputs": inputs, "_meta": {"title": title}}  # noqa: E731
    g = {"1": node("UNETLoader", "Model", unet_name="tiny", weight_dtype="default"),
         "2": node("CLIPLoader", "CLIP", clip_name="tiny", type="chroma"),
         "10": node("T5TokenizerOptions", "T5", clip=["2", 0], min_padding=1, min_length=0),
         "3": node("CLIPTextEncode", "Positive", text=text, clip=["10", 0]),
         "4": node("CLIPTextEncode", "Negative", text="", clip=["10", 0]),
         "5": node("EmptySD3LatentImage", "Latent", width=size, height=size, batch_size=batch),
         "6": node("KSampler", "Sampler", model=["1", 0], seed=seed, steps=steps, cfg=2.0, sampler_name="euler",
                   scheduler="simple", positive=["3", 0], negative=["4", 0], latent_image=latent or ["5", 0],
                   denoise=1.0),
         "7": node("VAELoader", "VAE", vae_name="tiny"),
         "8": node("VAEDecode", "Decode", samples=["6", 0], vae=["7", 0]),
         "9": node("SaveImage", "Save Image", images=["8", 0], filename_prefix="cf")}
    return g


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy")
    with running_server(base) as (url, app):
        yield url, ComfyApiWrapper(url), httpx.Client(base_url=url, timeout=60), base


def wait_history(http, prompt_id, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        h = http.get(f"/history/{prompt_id}").json()
        if h:
            return h[prompt_id]
        time.sleep(0.05)
    raise AssertionError(f"{prompt_id} never reached the history")


def test_client_runs_a_workflow_and_reads_images(live):
    url, api, http, base = live
    wf = ComfyWorkflowWrapper(graph(batch=2))
    wf.set_node_param("Positive", "text", "a blue square")
    images = api.queue_and_wait_images(wf, "Save Image")
    assert len(images) == 2
    for data in images.values():
        im = Image.open(io.BytesIO(data))
        assert im.size == (64, 64) and np.asarray(im).std() > 0
        assert json.loads(im.text["prompt"])["3"]["inputs"]["text"] == "a blue square"  # ComfyUI's prompt chunk
        assert "Seed: " in im.text["parameters"]
    # the same graph again: every node cached, the history still lists the outputs
    prompt_id = api.queue_prompt(graph(text="a blue square", batch=2))["prompt_id"]
    h = wait_history(http, prompt_id)
    cached = dict(h["status"]["messages"])["execution_cached"]["nodes"]
    assert set(cached) == set(graph()) and len(h["outputs"]["9"]["images"]) == 2
    # a workflow in extra_pnginfo lands in the PNG's workflow chunk
    r = http.post("/api/prompt", json={"prompt": graph(seed=5), "extra_data": {"extra_pnginfo": {"workflow": {"nodes": [1]}}}})
    out = wait_history(http, r.json()["prompt_id"])["outputs"]["9"]["images"][0]
    im = Image.open(io.BytesIO(api.get_image(out["filename"], out["subfolder"], out["type"])))
    assert json.loads(im.text["workflow"]) == {"nodes": [1]}


def test_websocket_event_sequence(live):
    url, api, http, base = live
    ws_url = url.replace("http", "ws") + "/ws?clientId=abc"
    with connect(ws_url) as ws:
        first = json.loads(ws.recv())
        assert first["type"] == "status" and first["data"]["sid"] == "abc"
        pid = http.post("/prompt", json={"prompt": graph(seed=11), "client_id": "abc"}).json()["prompt_id"]
        events = []
        while True:
            m = json.loads(ws.recv(timeout=60))
            events.append(m)
            if m["type"] == "executing" and m["data"]["node"] is None:
                assert http.get(f"/history/{pid}").json()[pid]["status"]["completed"]  # history already written
                break
    kinds = [m["type"] for m in events if m["type"] != "status"]
    assert kinds[0] == "execution_start" and kinds[1] == "execution_cached"
    assert {"executing", "progress", "executed", "execution_success"} <= set(kinds)
    assert kinds.index("execution_success") < len(kinds) - 1
    progress = [m["data"] for m in events if m["type"] == "progress"]
    assert [p["value"] for p in progress] == [1, 2, 3] and progress[0]["max"] == 3 and progress[0]["node"] == "6"
    executed = [m["data"] for m in events if m["type"] == "executed"]
    assert executed[0]["node"] == "9" and executed[0]["output"]["images"][0]["type"] == "output"
    cached = [m["data"]["nodes"] for m in events if m["type"] == "execution_cached"][0]
    assert "1" in cached and "6" not in cached  # loaders unchanged since the last prompt, the sampler's seed changed


def test_upload_img2img_inpaint_and_custom_sampler(live, tmp_path):
    url, api, http, base = live
    src = tmp_path / "src.png"
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    rgba[:, :32, 3] = 0  # transparent left half = the inpainting mask (1 - alpha)
    Image.fromarray(rgba).save(src)
    up = api.upload_image(src, subfolder="")
    assert up == {"name": "src.png", "subfolder": "", "type": "input"}
    g = graph(latent=["13", 0])
    g["11"] = {"class_type": "LoadImage", "inputs": {"image": "src.png"}}
    g["12"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["11", 0], "vae": ["7", 0]}}
    g["13"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["12", 0], "mask": ["11", 1]}}
    g["6"]["inputs"]["denoise"] = 0.8
    g["6"]["inputs"]["seed"] = 3
    h = wait_history(http, api.queue_prompt(g)["prompt_id"])
    assert h["status"]["status_str"] == "success", h["status"]
    out = h["outputs"]["9"]["images"][0]
    im = np.asarray(Image.open(io.BytesIO(api.get_image(out["filename"], "", "output"))).convert("RGB")).astype(int)
    assert np.abs(im[:, 40:] - [200, 0, 0]).max() <= 3  # the kept (opaque) half is the input
    assert np.abs(im[:, :24] - [200, 0, 0]).mean() > 3  # the masked half was repainted
    # SamplerCustomAdvanced with a fixed shift, a guider, a scheduler and noise; then a scaled preview
    c = graph()
    c["6"] = {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["20", 0], "guider": ["21", 0],
              "sampler": ["22", 0], "sigmas": ["23", 0], "latent_image": ["5", 0]}}
    c["20"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 4}}
    c["24"] = {"class_type": "ModelSamplingFlux", "inputs": {"model": ["1", 0], "max_shift": 1.15, "base_shift": 0.5,
               "width": 64, "height": 64}}
    c["21"] = {"class_type": "CFGGuider", "inputs": {"model": ["24", 0], "positive": ["3", 0], "negative": ["4", 0], "cfg": 2.0}}
    c["22"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "dpmpp_2m"}}
    c["23"] = {"class_type": "BasicScheduler", "inputs": {"model": ["24", 0], "scheduler": "beta", "steps": 3, "denoise": 1.0}}
    c["25"] = {"class_type": "ImageScale", "inputs": {"image": ["8", 0], "upscale_method": "bilinear", "width": 32,
               "height": 0, "crop": "disabled"}}
    c["26"] = {"class_type": "PreviewImage", "inputs": {"images": ["25", 0]}}
    h = wait_history(http, api.queue_prompt(c)["prompt_id"])
    assert h["status"]["status_str"] == "success", h["status"]
    preview = h["outputs"]["26"]["images"][0]
    assert preview["type"] == "temp"
    assert Image.open(io.BytesIO(api.get_image(preview["filename"], "", "temp"))).size == (32, 32)
    saved = h["outputs"]["9"]["images"][0]
    meta = Image.open(io.BytesIO(api.get_image(saved["filename"], "", "output"))).text
    assert "Sampler: DPM++ 2M" in meta["parameters"] and "Schedule type: Beta" in meta["parameters"]


def test_queue_front_delete_and_interrupt(live):
    url, api, http, base = live
    long = http.post("/prompt", json={"prompt": graph(steps=10000, seed=100)}).json()["prompt_id"]
    deadline = time.time() + 30
    while http.get("/queue").json()["queue_running"] == [] and time.time() < deadline:
        time.sleep(0.05)
    b = http.post("/prompt", json={"prompt": graph(seed=101)}).json()["prompt_id"]
    c = http.post("/prompt", json={"prompt": graph(seed=102), "front": True}).json()["prompt_id"]
    q = api.get_queue()
    assert [e[1] for e in q["queue_running"]] == [long]
    assert [e[1] for e in q["queue_pending"]] == [c, b]  # front jumps the line
    assert api.get_queue_size_before(b) == 2
    http.post("/queue", json={"delete": [b]})
    api.interrupt()
    h = wait_history(http, long)
    assert h["status"]["status_str"] == "error"
    assert dict(h["status"]["messages"])["execution_interrupted"]["node_type"] == "KSampler"
    assert wait_history(http, c)["status"]["status_str"] == "success"
    assert "deleted" in json.dumps(wait_history(http, b)["status"])  # recorded, not lost
    # interrupting by prompt_id only stops that job
    http.post("/interrupt", json={"prompt_id": "not-running"})
    assert http.get("/prompt").json() == {"exec_info": {"queue_remaining": 0}}


def test_validation_errors_are_comfyui_shaped(live):
    url, api, http, base = live

    def post(body):
        r = http.post("/prompt", content=body if isinstance(body, bytes) else json.dumps(body))
        return r.status_code, r.json()

    status, body = post(b"{oops")
    assert status == 400 and body["error"]["type"] == "invalid_json"
    status, body = post({"client_id": "x"})
    assert status == 400 and body["error"]["type"] == "no_prompt"
    status, body = post({"prompt": {"1": {"class_type": "NoSuchNode", "inputs": {}}}})
    assert status == 400 and body["error"]["type"] == "invalid_prompt" and "NoSuchNode" in body["error"]["message"]
    g = graph()
    del g["9"]
    assert post({"prompt": g})[1]["error"]["type"] == "prompt_no_outputs"
    cases = {("6", "steps"): ("many", "invalid_input_type"), ("6", "cfg"): (500, "value_bigger_than_max"),
             ("6", "sampler_name"): ("warp", "value_not_in_list"), ("5", "width"): (8, "value_smaller_than_min"),
             ("6", "model"): (["99", 0], "bad_linked_input"), ("8", "vae"): (["1", 0], "return_type_mismatch")}
    for (nid, name), (value, kind) in cases.items():
        g = graph()
        g[nid]["inputs"][name] = value
        status, body = post({"prompt": g})
        assert status == 400 and body["error"]["type"] == "prompt_outputs_failed_validation", (name, body)
        err = body["node_errors"][nid]["errors"][0]
        assert err["type"] == kind and err["extra_info"]["input_name"] == name, (name, err)
        assert body["node_errors"][nid]["dependent_outputs"] == ["9"]
    g = graph()
    del g["6"]["inputs"]["seed"]
    assert post({"prompt": g})[1]["node_errors"]["6"]["errors"][0]["type"] == "required_input_missing"
    g = graph(size=4096)
    status, body = post({"prompt": g})
    assert body["node_errors"]["5"]["errors"][0]["type"] == "custom_validation_failed"
    assert "--max-pixels" in body["node_errors"]["5"]["errors"][0]["details"]
    # the worker still serves
    assert wait_history(http, api.queue_prompt(graph(seed=77))["prompt_id"])["status"]["status_str"] == "success"


def test_view_refuses_traversal_and_uploads_are_checked(live, tmp_path):
    url, api, http, base = live
    (base / "secret.txt").write_text("no")
    os.symlink(base / "secret.txt", base / "output" / "link.png")
    assert http.get("/view", params={"filename": "../secret.txt"}).status_code == 400
    assert http.get("/view", params={"filename": "x", "subfolder": "../.."}).status_code == 400
    assert http.get("/view", params={"filename": str(base / "secret.txt")}).status_code == 400
    assert http.get("/view", params={"filename": "link.png"}).status_code == 403
    assert http.get("/view", params={"filename": "missing.png"}).status_code == 404
    assert http.get("/view", params={"filename": "a.png", "type": "etc"}).status_code == 400
    r = http.post("/upload/image", files={"image": ("x.png", b"this is not an image")})
    assert r.status_code == 415 and "not a readable image" in r.json()["detail"]
    r = http.post("/upload/image", files={"image": ("../x.png", _png())}, data={"subfolder": "../.."})
    assert r.status_code == 400
    big = b"\x89PNG" + bytes(21 * 1024 * 1024)
    r = http.post("/upload/image", files={"image": ("big.png", big)})
    assert r.status_code == 413 and "--max-upload-mb" in r.json()["detail"]
    first = http.post("/upload/image", files={"image": ("same.png", _png(1))}).json()
    second = http.post("/upload/image", files={"image": ("same.png", _png(2))}).json()
    assert first["name"] == "same.png" and second["name"] == "same (1).png"


def test_informational_routes(live):
    url, api, http, base = live
    info = api.get_object_info()
    assert set(CORE) <= set(info) and set(NODES) == set(info)
    ks = api.get_object_info("KSampler")["KSampler"]["input"]["required"]
    assert ks["steps"] == ["INT", {"default": 20, "min": 1, "max": 10000, "step": 1}]
    assert ks["cfg"][1]["default"] == 8.0 and "euler" in ks["sampler_name"][0]
    assert info["CLIPLoader"]["input"]["required"]["type"][0] == ["chroma"]
    for folder, node, field in (("diffusion_models", "UNETLoader", "unet_name"), ("vae", "VAELoader", "vae_name"),
                                ("text_encoders", "CLIPLoader", "clip_name")):
        assert http.get(f"/models/{folder}").json()[0] == "tiny"  # the built-in model is listed first
        assert info[node]["input"]["required"][field][0][0] == "tiny"
    assert info["SaveImage"]["output_node"] is True and info["LoadImage"]["input"]["required"]["image"][1] == {"image_upload": True}
    assert http.get("/models/nope").status_code == 404
    stats = api.get_system_stats()
    assert stats["devices"][0]["type"] in ("cpu", "cuda") and "pytorch_version" in stats["system"]
    assert api.get_embeddings() == []
    assert http.get("/api/features").json()["max_upload_size"] == 20 * 1024 * 1024
    assert http.get("/api/object_info/KSampler").json() == http.get("/object_info/KSampler").json()


def test_token_and_host_guard(tmp_path):
    with pytest.raises(ValueError, match="--token"):
        create_app(ServerConfig(host="0.0.0.0", base_dir=str(tmp_path)))
    create_app(ServerConfig(host="0.0.0.0", allow_remote=True, base_dir=str(tmp_path)))
    create_app(ServerConfig(host="192.168.1.5", token="s", base_dir=str(tmp_path)))
    with running_server(tmp_path, token="s3cret") as (url, app):
        assert httpx.get(f"{url}/queue").status_code == 401
        assert httpx.get(f"{url}/sdapi/v1/progress", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{url}/queue", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(f"{url}/api/queue?token=s3cret").status_code == 200
        with pytest.raises(Exception):
            with connect(url.replace("http", "ws") + "/ws") as ws:
                ws.recv(timeout=5)
        with connect(url.replace("http", "ws") + "/ws?token=s3cret") as ws:
            assert json.loads(ws.recv(timeout=5))["type"] == "status"


def test_shutdown_finishes_the_running_job_and_records_cancelled_ones(tmp_path):
    with running_server(tmp_path, shutdown_grace=1.0) as (url, app):
        http = httpx.Client(base_url=url, timeout=30)
        running = http.post("/prompt", json={"prompt": graph(steps=10000)}).json()["prompt_id"]
        pending = http.post("/prompt", json={"prompt": graph(seed=9)}).json()["prompt_id"]
        while not http.get("/queue").json()["queue_running"]:
            time.sleep(0.05)
    history = app.state.server.history.items
    assert history[running]["status"]["status_str"] == "error"  # interrupted after the grace period
    assert "shut down" in json.dumps(history[pending]["status"])  # cancelled with a reason, not lost


def _png(value=0) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()
