"""Under load and bad input: 50 concurrent clients against a bounded queue, with malformed requests mixed in.
Every job either completes exactly once or is refused with a reason; the worker keeps serving throughout."""

from __future__ import annotations

import base64
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx

from test_server_comfy import graph, wait_history
from test_server_support import running_server

BAD = [  # (method, path, body) -> each must be a 4xx with a reason
    ("POST", "/prompt", b"{broken"),
    ("POST", "/prompt", json.dumps({"prompt": {"1": {"class_type": "Nope", "inputs": {}}}}).encode()),
    ("POST", "/prompt", json.dumps({"prompt": {**graph(), "5": {"class_type": "EmptySD3LatentImage",
                                    "inputs": {"width": "wide", "height": 32, "batch_size": 1}}}}).encode()),
    ("POST", "/prompt", json.dumps({"prompt": graph(steps=-3)}).encode()),
    ("POST", "/prompt", json.dumps({"prompt": graph(size=16384)}).encode()),
    ("POST", "/sdapi/v1/txt2img", b"[1, 2"),
    ("POST", "/sdapi/v1/txt2img", json.dumps({"prompt": "x", "width": 4096, "height": 4096}).encode()),
    ("POST", "/sdapi/v1/txt2img", json.dumps({"prompt": "x", "cfg_scale": "high"}).encode()),
    ("POST", "/sdapi/v1/img2img", json.dumps({"init_images": [base64.b64encode(b"GIF89a junk").decode()]}).encode()),
]


def test_fifty_clients_and_bad_input(tmp_path):
    with running_server(tmp_path, max_queue=20) as (url, app):
        outcomes, lock = [], threading.Lock()

        def comfy_client(i):
            with httpx.Client(base_url=url, timeout=120) as http:
                r = http.post("/prompt", json={"prompt": graph(steps=2, size=32, seed=1000 + i),
                                               "client_id": f"c{i}"})
                if r.status_code == 200:
                    h = wait_history(http, r.json()["prompt_id"], timeout=300)
                    result = ("done", r.json()["prompt_id"], h["status"]["status_str"],
                              [im["filename"] for im in h["outputs"]["9"]["images"]])
                else:
                    result = ("refused", r.status_code, r.json()["error"]["message"])
            with lock:
                outcomes.append(result)

        def a1111_client(i):
            with httpx.Client(base_url=url, timeout=300) as http:
                r = http.post("/sdapi/v1/txt2img", json={"prompt": f"job {i}", "steps": 2, "width": 32, "height": 32,
                                                         "seed": 2000 + i})
                result = (("done", json.loads(r.json()["info"])["all_seeds"], "success", r.json()["images"])
                          if r.status_code == 200 else ("refused", r.status_code, r.json()["detail"]))
            with lock:
                outcomes.append(result)

        def bad_client(i):
            method, path, body = BAD[i % len(BAD)]
            r = httpx.request(method, url + path, content=body, timeout=60)
            with lock:
                outcomes.append(("bad", r.status_code, r.text))

        clients = [comfy_client] * 30 + [a1111_client] * 20
        with ThreadPoolExecutor(max_workers=50 + len(BAD)) as pool:
            futures = [pool.submit(fn, i) for i, fn in enumerate(clients)]
            futures += [pool.submit(bad_client, i) for i in range(len(BAD))]
            for f in futures:
                f.result()

        done = [o for o in outcomes if o[0] == "done"]
        refused = [o for o in outcomes if o[0] == "refused"]
        bad = [o for o in outcomes if o[0] == "bad"]
        assert len(done) + len(refused) == 50 and len(bad) == len(BAD)
        assert done and refused, "a queue of 20 should both take and refuse some of 50 simultaneous jobs"
        assert all(o[2] == "success" for o in done)
        for _, status, reason in refused:
            assert status == 503 and "queue is full" in reason
        for _, status, text in bad:
            assert 400 <= status < 500 and len(text) > 20, (status, text)
        comfy_ids = [o[1] for o in done if isinstance(o[1], str)]
        assert len(set(comfy_ids)) == len(comfy_ids)  # no duplicated jobs
        history = app.state.server.history.items
        assert set(comfy_ids) <= set(history)  # none lost
        files = [f for o in done if isinstance(o[1], str) for f in o[3]]
        assert len(set(files)) == len(files) == len(comfy_ids)  # one image each, none overwritten
        seeds = [o[1][0] for o in done if isinstance(o[1], list)]
        assert len(set(seeds)) == len(seeds)
        # and it still serves
        with httpx.Client(base_url=url, timeout=60) as http:
            assert http.get("/prompt").json()["exec_info"]["queue_remaining"] == 0
            r = http.post("/sdapi/v1/txt2img", json={"prompt": "after", "steps": 1, "width": 32, "height": 32})
            assert r.status_code == 200 and len(r.json()["images"]) == 1
