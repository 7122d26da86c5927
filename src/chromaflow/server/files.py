"""The server's folders (output/, input/, temp/, models/) and the only ways in and out of them.

Every client-supplied name goes through `resolve`: `..` components and absolute paths are refused (400), and a
path whose real location (symlinks followed) leaves its folder is refused (403), so /view and uploads cannot
reach other files.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

from PIL import Image

KINDS = ("output", "input", "temp")


class FileError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Folders:
    def __init__(self, base: str | Path):
        self.base = Path(base).resolve()
        for kind in KINDS + ("models",):
            self.folder(kind).mkdir(parents=True, exist_ok=True)

    def folder(self, kind: str) -> Path:
        if kind not in KINDS + ("models",):
            raise FileError(400, f"unknown folder type {kind!r}; valid: {', '.join(KINDS)}")
        return self.base / kind

    def resolve(self, kind: str, subfolder: str, filename: str) -> Path:
        """A path inside folder `kind`, refusing traversal: 400 for `..` / absolute parts, 403 for escapes."""
        root = self.folder(kind)
        for part in (subfolder, filename):
            if os.path.isabs(part) or part.startswith(("/", "\\")) or ".." in Path(part).parts or "\x00" in part:
                raise FileError(400, f"invalid path {part!r}: no '..' or absolute paths")
        path = root / subfolder / filename
        real = Path(os.path.realpath(path))
        if not real.is_relative_to(os.path.realpath(root)):
            raise FileError(403, f"{subfolder}/{filename} resolves outside the {kind} folder")
        return path

    def save_image(self, data: bytes, filename: str, subfolder: str = "", kind: str = "input",
                   overwrite: bool = False) -> dict:
        """Store an uploaded image; a name clash gets ' (1)', ' (2)', ... unless the bytes are identical."""
        check_image(data)
        if not filename or filename in (".", ".."):
            raise FileError(400, "the upload has no file name")
        path = self.resolve(kind, subfolder, Path(filename).name)
        stem, suffix, n = path.stem, path.suffix, 1
        while path.exists() and not overwrite and _digest(path.read_bytes()) != _digest(data):
            path = path.with_name(f"{stem} ({n}){suffix}")
            n += 1
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # atomic: a reader never sees half an upload
        return {"name": path.name, "subfolder": subfolder, "type": kind}

    def images(self, kind: str = "input") -> list[str]:
        root = self.folder(kind)
        return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                      if p.is_file() and p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))


def check_image(data: bytes) -> Image.Image:
    """Decode-check an upload (415 if it is not an image PIL can read)."""
    try:
        image = Image.open(io.BytesIO(data))
        image.verify()
        return Image.open(io.BytesIO(data))
    except Exception as e:
        raise FileError(415, f"not a readable image ({type(e).__name__}: {e})") from None


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
