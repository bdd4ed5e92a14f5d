"""A picture of nearest neighbours: each row a query image followed by its k nearest training images, framed green
when the neighbour's label matches the query's and red when it does not. Covered by tests/test_neighbors.py."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .atomic import atomic_write
from .data import build_dataset
from .errors import InstdiscError
from .features import extract_features
from .source import open_model

__all__ = ["neighbor_grid", "render_grid"]

GREEN, RED, GRAY, WHITE = (40, 170, 60), (210, 40, 40), (120, 120, 120), (255, 255, 255)


def render_grid(rows: list[list[Image.Image]], frames: list[list[tuple]], cell: int = 64, border: int = 4,
                gap: int = 12) -> Image.Image:
    """Compose rows of images (first = query) into one RGB picture; ``frames`` gives each cell's frame colour."""
    ncol = max(len(r) for r in rows)
    step = cell + 2 * border + 2
    width = ncol * step + gap
    canvas = Image.new("RGB", (width, len(rows) * step), WHITE)
    draw = ImageDraw.Draw(canvas)
    for r, (imgs, cols) in enumerate(zip(rows, frames)):
        for c, (img, colour) in enumerate(zip(imgs, cols)):
            x = c * step + (gap if c > 0 else 0)
            y = r * step
            draw.rectangle([x, y, x + cell + 2 * border - 1, y + cell + 2 * border - 1], fill=colour)
            canvas.paste(img.convert("RGB").resize((cell, cell), Image.NEAREST), (x + border, y + border))
    return canvas


def neighbor_grid(model, *, train: str, query: str, out, n: int = 8, k: int = 10, layer: str = "encoder",
                  seed: int = 0, device="cpu", data_root=None, limit: int | None = None, cell: int = 64) -> dict:
    """Write the picture to ``out`` (PNG, atomically); returns {"path", "queries", "k", "match_rate"}."""
    from .knn import search

    from .arguments import check_int

    if n < 1 or k < 1:
        raise InstdiscError(f"--n and --k must be >= 1, got n={n}, k={k}")
    check_int(limit, "--limit", 1, optional=True)
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise InstdiscError(f"--out must be a .png file, got {out}")
    if not out.parent.exists():
        raise InstdiscError(f"output folder does not exist: {out.parent}")
    src = open_model(model, device=device)
    gallery_ds = src.prepare(build_dataset(train, data_root=data_root, limit=limit))
    query_ds = src.prepare(build_dataset(query, data_root=data_root))
    k = min(k, len(gallery_ds))
    pick = np.sort(np.random.default_rng(seed).choice(len(query_ds), size=min(n, len(query_ds)), replace=False))
    with torch.no_grad():
        g = extract_features(src.fn(layer), gallery_ds, device=device)
        q = extract_features(src.fn(layer), _RowView(query_ds, pick), device=device)
    _, ids = search(g.features, q.features, k)  # (n, k)
    rows, frames, matches = [], [], []
    for qi, nb in zip(pick, ids):
        ql = int(query_ds.labels[qi])
        rows.append([query_ds.load_image(int(qi))] + [gallery_ds.load_image(int(j)) for j in nb])
        same = [ql >= 0 and int(gallery_ds.labels[j]) == ql for j in nb]
        matches.extend(same)
        frames.append([GRAY] + [GREEN if s else RED for s in same])
    picture = render_grid(rows, frames, cell=cell)
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    atomic_write(out, lambda f: f.write(buf.getvalue()))
    return {"path": str(out), "queries": [int(i) for i in pick], "k": k,
            "match_rate": float(np.mean(matches)) if matches else None}


class _RowView(torch.utils.data.Dataset):
    """Rows ``rows`` of a dataset, renumbered 0..len-1 (read through the file/PIL path; meant for a few rows)."""

    def __init__(self, ds, rows):
        self.ds, self.rows = ds, np.asarray(rows)
        self.labels = np.asarray(ds.labels)[self.rows]
        self.array = None
        self.channels, self.image_size, self.mean, self.std = ds.channels, ds.image_size, ds.mean, ds.std
        self.spec = ds.spec

    def __len__(self):
        return len(self.rows)

    def load_image(self, i):
        return self.ds.load_image(int(self.rows[i]))

    def with_transform(self, t):
        return _RowView(self.ds.with_transform(t), self.rows)

    def __getitem__(self, i):
        x, _, y = self.ds[int(self.rows[i])]
        return x, i, y
