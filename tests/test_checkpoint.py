"""safetensors I/O: validation of untrusted files, lazy reads across shards, atomic writes, pickle refusal."""

import json
import struct

import pytest
import torch
from safetensors.torch import load_file

from chromaflow.formats import checkpoint
from chromaflow.formats.checkpoint import CheckpointError, check_safetensors, open_checkpoint, save_checkpoint


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(4, 3, generator=g).to(torch.bfloat16), "a.bias": torch.randn(4, generator=g),
            "steps": torch.arange(5), "scalar": torch.tensor(2.5, dtype=torch.float16),
            "flags": torch.tensor([True, False]), "empty": torch.zeros(0, 3)}


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_save_open_round_trip(tmp_path):
    t = sample_tensors()
    path = save_checkpoint(t, tmp_path / "m.safetensors", {"note": "hi"})
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind
    assert check_safetensors(path)["__metadata__"] == {"note": "hi"}
    with open_checkpoint(path) as ckpt:
        assert sorted(ckpt.keys()) == sorted(t) and ckpt.files == [path] and ckpt.metadata == {"note": "hi"}
        assert ckpt.shape("a.weight") == (4, 3) and ckpt.dtype("a.weight") == torch.bfloat16
        assert ckpt.dtype_name("steps") == "int64"
        for k, v in t.items():
            assert_same(ckpt.get(k), v)
        assert_same(ckpt.get("a.weight", slice(1, 3)), t["a.weight"][1:3])
    for k, v in load_file(path).items():  # the reference reader accepts our writer
        assert_same(v, t[k])


def test_views_sharing_storage_are_written(tmp_path):
    fused = torch.randn(6, 4)
    t = {"q": fused[:2], "k": fused[2:4], "v": fused[4:], "col": fused[:, 1]}
    with open_checkpoint(save_checkpoint(t, tmp_path / "v.safetensors")) as ckpt:
        for k, v in t.items():
            assert_same(ckpt.get(k), v)


def test_failed_save_keeps_old_file(tmp_path, monkeypatch):
    path = save_checkpoint({"x": torch.ones(3)}, tmp_path / "m.safetensors")

    def broken(t):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "_payload", broken)
    with pytest.raises(OSError):
        save_checkpoint({"x": torch.zeros(3)}, path)
    assert list(tmp_path.iterdir()) == [path]
    assert torch.equal(load_file(path)["x"], torch.ones(3))


def write_shards(folder, stem="diffusion_pytorch_model"):
    folder.mkdir(parents=True, exist_ok=True)
    t = sample_tensors()
    names = [f"{stem}-0000{i}-of-00002.safetensors" for i in (1, 2)]
    save_checkpoint({k: t[k] for k in ("a.weight", "a.bias")}, folder / names[0], {"a": "1"})
    save_checkpoint({k: t[k] for k in ("steps", "scalar")}, folder / names[1], {"b": "2"})
    weight_map = {"a.weight": names[0], "a.bias": names[0], "steps": names[1], "scalar": names[1]}
    index = folder / f"{stem}.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index, t


def test_sharded_index_file_and_folders(tmp_path):
    index, t = write_shards(tmp_path / "pipe" / "transformer")
    for target in (index, index.parent, tmp_path / "pipe"):  # the index, its folder, a pipeline folder above it
        with open_checkpoint(target) as ckpt:
            assert sorted(ckpt.keys()) == ["a.bias", "a.weight", "scalar", "steps"]
            assert ckpt.metadata == {"a": "1", "b": "2"} and len(ckpt.files) == 2
            assert_same(ckpt.get("steps"), t["steps"])
            assert_same(ckpt.get("a.weight"), t["a.weight"])


def test_folder_with_one_plain_file(tmp_path):
    save_checkpoint({"x": torch.ones(2)}, tmp_path / "chroma.safetensors")
    assert open_checkpoint(tmp_path).files == [tmp_path / "chroma.safetensors"]
    save_checkpoint({"x": torch.ones(2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="several checkpoints.*chroma.safetensors"):
        open_checkpoint(tmp_path)


def test_index_errors_name_the_shard(tmp_path):
    index, _ = write_shards(tmp_path)
    (tmp_path / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard diffusion_pytorch_model-00002-of-00002.safetensors is missing"):
        open_checkpoint(index)
    weight_map = {"ghost": "diffusion_pytorch_model-00001-of-00002.safetensors"}
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="'ghost'.*does not contain it"):
        open_checkpoint(index)


def test_missing_file_and_key(tmp_path):
    with pytest.raises(CheckpointError, match="nope.safetensors: no such file"):
        open_checkpoint(tmp_path / "nope.safetensors")
    path = save_checkpoint({"x": torch.ones(2)}, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="m.safetensors: has no tensor 'y'"):
        open_checkpoint(path).get("y")


@pytest.mark.parametrize("content", [b"abc", b"just some text, not weights at all", struct.pack("<Q", 4) + b"abcd",
                                     struct.pack("<Q", 2) + b"[]"])
def test_not_safetensors(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: not a safetensors file"):
        check_safetensors(path)


def test_truncated_header_and_data(tmp_path):
    raw = save_checkpoint({"x": torch.randn(16)}, tmp_path / "ok.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    cut_header = tmp_path / "cut_header.safetensors"
    cut_header.write_bytes(raw[:8 + n // 2])
    with pytest.raises(CheckpointError, match=r"cut_header\.safetensors: truncated header"):
        open_checkpoint(cut_header)
    cut_data = tmp_path / "cut_data.safetensors"
    cut_data.write_bytes(raw[:-4])
    msg = rf"cut_data\.safetensors: truncated data \(file is {len(raw) - 4} bytes, header says {len(raw)}\)"
    with pytest.raises(CheckpointError, match=msg):
        open_checkpoint(cut_data)


@pytest.mark.parametrize("name", ["model.ckpt", "pytorch_model.bin", "weights.pt"])
def test_pickle_files_are_refused(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x80\x04\x95 pickled")  # never unpickled: the suffix alone decides
    with pytest.raises(CheckpointError, match=rf"{name}: refusing to load a pickle.*convert it to \.safetensors"):
        open_checkpoint(path)


def test_pickle_folder_and_disguised_pickle(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="refusing to load a pickle"):
        open_checkpoint(tmp_path)
    disguised = tmp_path / "disguised.safetensors"
    torch.save({"x": torch.ones(2)}, disguised)  # a torch zip behind a safetensors name
    with pytest.raises(CheckpointError, match=r"disguised\.safetensors: not a safetensors file.*pickle"):
        open_checkpoint(disguised)
