"""Every benchmark script runs end to end at its smoke size and prints a JSON report, so none can rot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SMOKE = {
    "transformer_curves.py": ["--quick", "--json"],
    "mfu_breakdown.py": ["--quick", "--json"],
    "samplers.py": ["--n", "1", "--steps", "2", "--samplers", "euler", "dpmpp_2m"],
    "hires.py": ["--smoke"],
    "formats.py": ["--quick"],
    "full_size_gguf.py": ["--preset", "tiny", "--size", "64"],
    "lora_concept.py": ["--quick"],
    "caching.py": ["--model", "tiny", "--n", "1", "--steps", "4", "--fbc", "0.1", "--teacache", "0.3",
                   "--start", "0.25", "--max-skips", "2"],
}


def first_json_object(text: str) -> dict:
    """The report is the first JSON object printed (a markdown table may follow)."""
    start = text.index("{")
    return json.JSONDecoder().raw_decode(text[start:])[0]


@pytest.mark.parametrize("script", sorted(SMOKE))
def test_benchmark_smoke_run_prints_a_report(script, tmp_path):
    out = tmp_path / "report.json"
    args = SMOKE[script] + ([] if script in ("transformer_curves.py", "mfu_breakdown.py") else ["--out", str(out)])
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                          text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    report = first_json_object(done.stdout)
    assert report
    if script == "caching.py":  # every cached cell counted its calls, and a full pass never exceeds a call
        assert all(0 < c["full_passes"] <= c["calls"] for c in report["cells"][1:])
    if script == "mfu_breakdown.py":  # the three parts are the profiled total; the ceiling drops the third
        run = report["runs"][0]
        assert sum(run["ms"].values()) == pytest.approx(run["ms_profiled_total"])
        assert run["ms"]["linear"] > 0 and run["ms"]["attention"] > 0 and run["ceiling_mfu"] > run["mfu"] > 0
    if out.exists():
        assert json.loads(out.read_text()) == report


def test_the_lora_concept_classifier_tells_the_new_shape_and_colour_from_the_world_ones():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import lora_concept as lc
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    import numpy as np
    from chromaflow.engine import shapes
    rng = np.random.default_rng(0)
    for px in (128, 256):
        for size in ("small", "large"):
            mask, colour = lc.largest_object(lc.render_concept("cross", "green", size, "black", px, rng))
            assert lc.nearest_shape(mask) == "cross" and lc.nearest_colour(colour) == "green"
            mask, colour = lc.largest_object(lc.render_concept("star", "charcoal", size, "white", px, rng))
            assert lc.nearest_shape(mask) == "star" and lc.nearest_colour(colour) == "charcoal"
            for i, shape in enumerate(shapes.SHAPES * 3):
                scene = shapes.place(np.random.default_rng([px, i]), [(shape, "blue", size)])
                assert lc.nearest_shape(lc.largest_object(shapes.render(scene, px))[0]) == shape, (shape, px, size)
    assert lc.largest_object(shapes.render(shapes.place(rng, []), 64)) is None


def test_hires_benchmark_names_its_duplication_modes_when_one_is_unknown():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "hires.py"), "--smoke", "--modes", "plain",
                           "ntk"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown --modes ['ntk']" in done.stderr
    assert "choose from: plain; RoPE NTK;" in done.stderr
