"""The command line as a user drives it: generate PNGs with metadata, inspect files, one-line errors."""

import json

import pytest
from PIL import Image

from chromaflow.cli import main
from chromaflow import BUILTIN_DIR
from chromaflow.formats.layouts import save_transformer
from chromaflow.formats.png import read_png_settings
from chromaflow.models.transformer import build


def test_generate_writes_pngs_with_a1111_parameters_and_json_settings(tmp_path, capsys):
    out = tmp_path / "img.png"
    assert main(["generate", "a red circle", "-o", str(out), "--model", "tiny", "--seed", "5", "--batch", "2",
                 "--steps", "3", "--cfg", "2", "--negative", "blue", "--quiet"]) == 0
    written = capsys.readouterr().out.split()
    assert written == [str(out), str(tmp_path / "img-1.png")]
    with Image.open(out) as im:
        params = im.text["parameters"]
    lines = params.splitlines()
    assert lines[0] == "a red circle" and lines[1] == "Negative prompt: blue"
    assert "Steps: 3, Sampler: Euler" in lines[2] and "Seed: 5" in lines[2] and "Size: 64x64" in lines[2]
    second = read_png_settings(tmp_path / "img-1.png")
    assert second["seed"] == 6 and second["cfg"] == 2.0 and second["model"] == "tiny-random"


@pytest.mark.parametrize("argv, reason", [
    (["generate", "x", "--width", "100"], "multiple of 16"),
    (["generate", "x", "--steps", "0"], "at least 1"),
    (["generate", "x", "--model", "/no/such/model.safetensors"], "no such file"),
    (["info", "/no/such/file.safetensors"], "file.safetensors"),
    (["generate", "x", "--model", "tiny", "--image", "/no/such/photo.png"], "photo.png: no such file"),
    (["generate", "x", "--model", "tiny", "--strength", "0.5"], "add --image"),
    (["train", "--preset", "tiny", "--hours", "0"], "--hours must be positive"),
    (["convert", str(BUILTIN_DIR / "transformer.safetensors"), "out.bin", "--to", "q9"], "gguf:TYPE with TYPE one of"),
])
def test_bad_arguments_exit_nonzero_with_one_line_reason(argv, reason, capsys):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse rejects before running
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert reason in err[-1] and "Traceback" not in "\n".join(err)


def test_info_json_describes_a_checkpoint(tmp_path, capsys):
    path = tmp_path / "tiny.safetensors"
    save_transformer(build("tiny"), path, layout="diffusers", title="tiny test")
    assert main(["info", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layout"] == "diffusers" and report["architecture"] == "chroma"
    assert report["parameters"] == sum(p.numel() for p in build("tiny").parameters())
    assert report["dtypes"] == {"float32": report["tensors"]}
    assert report["metadata"]["modelspec.title"] == "tiny test"
