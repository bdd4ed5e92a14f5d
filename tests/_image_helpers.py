"""Test-only helpers: tiny image folders with mixed sizes and modes, and the ways a file can be bad."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

# (suffix, PIL mode): grayscale, RGB, RGBA, palette with transparency, 16-bit grayscale, CMYK JPEG
MODES = [(".png", "L"), (".jpg", "RGB"), (".png", "RGBA"), (".png", "P"), (".png", "I;16"), (".jpg", "CMYK"),
         (".bmp", "RGB"), (".gif", "P")]


def _image(mode: str, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    w, h = size
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    if mode == "P":
        return rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    return rgb.convert(mode)


def make_mixed_folder(root: Path, n_per_class: int = 8, classes=("a", "b", "c"), seed: int = 0) -> Path:
    """``root/<class>/<i><suffix>``: every file a different size (9..60 px a side) and one of :data:`MODES`."""
    rng = np.random.default_rng(seed)
    k = 0
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            suffix, mode = MODES[k % len(MODES)]
            size = (int(rng.integers(9, 61)), int(rng.integers(9, 61)))
            img = _image(mode, size, rng)
            kw = {"transparency": 0} if mode == "P" and suffix == ".png" else {}
            img.save(root / c / f"{i:03d}{suffix}", **kw)
            k += 1
    return root


def make_bad_files(folder: Path, good: Path) -> list[str]:
    """Add four bad files to ``folder`` and return their paths (sorted as the folder index lists them):
    truncated PNG, zero-byte JPEG, a text file named .jpg, a dangling symlink (unreadable, also for root)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = good.read_bytes()
    (folder / "bad_truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "bad_empty.jpg").write_bytes(b"")
    (folder / "bad_text.jpg").write_text("this is not an image\n")
    os.symlink(folder / "no-such-file.png", folder / "bad_unreadable.png")
    return sorted(str(folder / n) for n in ("bad_truncated.png", "bad_empty.jpg", "bad_text.jpg",
                                             "bad_unreadable.png"))
