"""A 2-D map of features, coloured by label: what ``instdisc plot-embedding`` draws. Covered by
tests/test_plots_embedding.py.

Features come from a model (a run folder or an exported encoder, run on a dataset with the eval transform) or from an
HDF5 features file of ``instdisc export-features``. They are L2-normalised first (the cosine geometry kNN uses), then
mapped to 2-D by PCA (:func:`pca`, always available) or t-SNE (:func:`tsne_2d`, scikit-learn from the ``[plot]``
extra, started from the PCA map). Unlabeled points (label -1) are grey; a few images can be drawn at their points.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..arguments import check_int
from ..errors import InstdiscError
from .canvas import check_png_path, new_figure, save_png

__all__ = ["MAP_SIZE", "METHODS", "draw_embedding", "embedding_map", "pca", "spread_points", "subset_rows",
           "tsne_2d"]

MAP_SIZE = (1200, 900)  # (width, height) in pixels of every map
METHODS = ("pca", "tsne")
_GREY = (0.62, 0.62, 0.62, 1.0)
_MAX_LEGEND = 30  # class entries shown in the legend; the rest are summed up in one line


def pca(features: np.ndarray, k: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(coordinates (N, k) float32, explained variance fraction (k,)) of the top-k principal components.

    Eigen-decomposition of the smaller of the covariance (D x D) and Gram (N x N) matrices, in float64. Signs are
    fixed: in each column the coordinate of largest magnitude is positive (the same map every time).
    """
    x = np.asarray(features, dtype=np.float64)  # (N, D)
    if x.ndim != 2 or x.shape[0] < 2:
        raise InstdiscError(f"a map needs at least 2 feature vectors, got shape {x.shape}")
    n, d = x.shape
    k = min(k, d, n)
    x = x - x.mean(axis=0, keepdims=True)
    total = float((x * x).sum())
    if not total > 0:
        raise InstdiscError(f"all {n} feature vectors are identical: there is nothing to map")
    if d <= n:
        w, v = np.linalg.eigh(x.T @ x)  # (D,), (D, D) ascending
        w, v = w[::-1][:k], v[:, ::-1][:, :k]
        xy = x @ v  # (N, k)
    else:
        w, u = np.linalg.eigh(x @ x.T)  # (N,), (N, N) ascending
        w, u = w[::-1][:k], u[:, ::-1][:, :k]
        xy = u * np.sqrt(np.clip(w, 0, None))  # (N, k)
    big = np.abs(xy).argmax(axis=0)  # (k,)
    xy = xy * np.sign(xy[big, np.arange(k)] + (xy[big, np.arange(k)] == 0))
    return xy.astype(np.float32), np.clip(w, 0, None) / total


def tsne_2d(features: np.ndarray, *, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """(N, 2) float32 t-SNE map (scikit-learn), of the features reduced to at most 50 PCA dimensions and started from
    their PCA map; the perplexity is capped at (N - 1) / 3 for small sets."""
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        raise InstdiscError("--method tsne needs scikit-learn: pip install 'instdisc[plot]'") from None
    n = len(features)
    if n < 5:
        raise InstdiscError(f"t-SNE needs at least 5 points, got {n}; use --method pca")
    reduced, _ = pca(features, k=50)  # (N, <=50)
    init = reduced[:, :2] / max(1e-12, float(reduced[:, 0].std())) * 1e-4  # PCA start, small scale (as sklearn's)
    if init.shape[1] < 2:
        init = np.pad(init, ((0, 0), (0, 2 - init.shape[1])))
    tsne = TSNE(n_components=2, perplexity=min(perplexity, (n - 1) / 3), init=init.astype(np.float32),
                learning_rate="auto", random_state=seed)
    return tsne.fit_transform(reduced).astype(np.float32)


def subset_rows(n: int, limit: int | None) -> np.ndarray:
    """Rows kept by ``--limit``: all of them, or ``default_rng(0).choice(n, limit, replace=False)`` sorted (the rule
    ``build_dataset(limit=...)`` uses)."""
    if limit is not None and limit < 1:
        raise InstdiscError(f"--limit must be >= 1, got {limit}")
    if limit is None or limit >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(0).choice(n, limit, replace=False)).astype(np.int64)


def spread_points(xy: np.ndarray, n: int) -> np.ndarray:
    """Indices of ``n`` points spread over the map (greedy farthest-point order, starting next to the centre)."""
    xy = np.asarray(xy, dtype=np.float64)  # (N, 2)
    n = min(n, len(xy))
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    picked = [int(((xy - xy.mean(axis=0)) ** 2).sum(axis=1).argmin())]
    dist = ((xy - xy[picked[0]]) ** 2).sum(axis=1)  # (N,) squared distance to the nearest picked point
    while len(picked) < n:
        i = int(dist.argmax())
        picked.append(i)
        dist = np.minimum(dist, ((xy - xy[i]) ** 2).sum(axis=1))
    return np.asarray(picked, dtype=np.int64)


def _class_colours(k: int) -> list:
    """``k`` class colours, none of them grey (grey is for unlabeled points)."""
    import matplotlib

    if k <= 20:
        cmap = matplotlib.colormaps["tab10" if k <= 10 else "tab20"]
        greys = {7: (0.1, 0.1, 0.1, 1.0)} if k <= 10 else {14: (0.1, 0.1, 0.1, 1.0), 15: (0.45, 0.3, 0.0, 1.0)}
        return [greys.get(i, cmap(i)) for i in range(k)]
    cmap = matplotlib.colormaps["turbo"]
    return [cmap(i / max(1, k - 1)) for i in range(k)]


def draw_embedding(xy: np.ndarray, labels: np.ndarray, out, *, classes: list[str] | None = None,
                   title: str = "", axis_labels: tuple[str, str] = ("1", "2"), thumbnails: dict | None = None) -> dict:
    """Scatter ``xy`` (N, 2) coloured by ``labels`` (N,) (-1: grey, "unlabeled") into the PNG ``out`` of
    :data:`MAP_SIZE`; ``classes[c]`` names label c in the legend; ``thumbnails``: {point index: PIL image} drawn at
    those points, framed in their class colour. Returns {"path", "size", "n", "labelled", "classes"}."""
    from matplotlib.lines import Line2D
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    xy = np.asarray(xy, dtype=np.float32)  # (N, 2)
    labels = np.asarray(labels, dtype=np.int64)  # (N,)
    if xy.ndim != 2 or xy.shape[1] != 2 or labels.shape != (len(xy),):
        raise InstdiscError(f"draw_embedding needs xy (N, 2) and labels (N,), got {xy.shape} and {labels.shape}")
    present = np.unique(labels[labels >= 0])
    n_colours = int(max(present.max() + 1 if len(present) else 0, len(classes or [])))
    colours = _class_colours(n_colours)
    size = min(30.0, max(4.0, 12000.0 / max(1, len(xy))))  # marker area (pt^2): larger for small sets
    fig = new_figure(*MAP_SIZE)
    ax = fig.add_subplot()
    unl = labels < 0
    if unl.any():
        ax.scatter(xy[unl, 0], xy[unl, 1], s=size, color=_GREY, alpha=0.5, linewidths=0, rasterized=True)
    order = np.random.default_rng(0).permutation(np.flatnonzero(~unl))  # mixed drawing order: no class on top
    ax.scatter(xy[order, 0], xy[order, 1], s=size, c=[colours[c] for c in labels[order]], alpha=0.75,
               linewidths=0, rasterized=True)

    def name(c: int) -> str:
        return classes[c] if classes is not None and c < len(classes) else f"class {c}"

    handles = [Line2D([], [], ls="none", marker="o", ms=7, color=colours[c], label=f"{name(int(c))}")
               for c in present[:_MAX_LEGEND]]
    if len(present) > _MAX_LEGEND:
        handles.append(Line2D([], [], ls="none", label=f"... {len(present) - _MAX_LEGEND} more classes"))
    if unl.any():
        handles.append(Line2D([], [], ls="none", marker="o", ms=7, color=_GREY, label=f"unlabeled ({int(unl.sum())})"))
    for i, img in (thumbnails or {}).items():
        a = np.asarray(img.convert("L" if img.mode in ("L", "1", "P") else "RGB"))
        box = OffsetImage(a, zoom=44 / max(a.shape[:2]), cmap="gray" if a.ndim == 2 else None)
        frame = colours[labels[i]] if labels[i] >= 0 else _GREY
        ax.add_artist(AnnotationBbox(box, (float(xy[i, 0]), float(xy[i, 1])), frameon=True, pad=0.15,
                                     bboxprops={"edgecolor": frame, "linewidth": 2}))
    fig.legend(handles=handles, title="label", loc="outside right upper", fontsize=9)
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    ax.set_title(title, fontsize=12)
    ax.grid(alpha=0.25)
    path = save_png(fig, out)
    return {"path": str(path), "size": MAP_SIZE, "n": int(len(xy)), "labelled": int((~unl).sum()),
            "classes": int(len(present))}


def _dataset_for_features(data: str, attrs: dict, data_root):
    """The dataset a features file was exported from (for its images), checked against the file's fingerprint."""
    from ..data import build_dataset

    limit = attrs.get("dataset_limit", -1)
    ds = build_dataset(data, data_root=data_root, limit=None if limit is None or limit < 0 else int(limit))
    want = attrs.get("dataset_fingerprint")
    if want and ds.fingerprint() != want:
        raise InstdiscError(f"{data} is not the dataset the features were exported from (fingerprint "
                            f"{ds.fingerprint()}, the file has {want}; it was exported from "
                            f"{attrs.get('dataset_spec')})")
    return ds


def _subset(ds, rows: np.ndarray):
    """``ds`` (an IndexedDataset) restricted to ``rows``."""
    from ..data import IndexedDataset

    if len(rows) == len(ds):
        return ds
    kw = dict(spec=ds.spec, labels=ds.labels[rows], classes=ds.classes, channels=ds.channels,
              image_size=ds.image_size, mean=ds.mean, std=ds.std, source_indices=ds.source_indices[rows])
    if ds.array is not None:
        from ..data.dataset import take_rows

        return IndexedDataset(array=take_rows(ds.array, rows), **kw)
    return IndexedDataset(paths=[ds.paths[int(i)] for i in rows], **kw)


def _features(source: str, data: str | None, *, layer: str, limit: int | None, device, data_root, batch_size: int,
              want_images: bool):
    """(features (n, D), labels (n,), class names, dataset for the images or None, row of each point in that dataset
    (n,), description of the features, the input named in errors)."""
    from ..evaluation import is_feature_file

    if is_feature_file(source):
        from ..export.hdf5 import read_features

        feats, labels, indices, attrs = read_features(source)
        rows = subset_rows(len(feats), limit)
        classes = json.loads(attrs.get("classes_json") or "[]")
        ds = None
        if want_images:
            if data is None:
                raise InstdiscError(f"--thumbnails needs DATA, the dataset {source} was exported from "
                                    f"({attrs.get('dataset_spec')})")
            ds = _dataset_for_features(data, attrs, data_root)
        what = f"{attrs.get('layer', '')} features of {Path(source).name} ({attrs.get('dataset_spec', '?')})"
        return feats[rows], labels[rows], classes, ds, indices[rows], what, source
    if data is None:
        raise InstdiscError(f"{source} is a model, so DATA (the dataset to embed) is needed")
    import torch

    from ..data import build_dataset
    from ..features import extract_features
    from ..source import open_model

    src = open_model(source, device=device)
    full = build_dataset(data, data_root=data_root)
    ds = src.prepare(_subset(full, subset_rows(len(full), limit)))
    with torch.no_grad():
        f = extract_features(src.fn(layer), ds, batch_size=batch_size, device=device)
    what = f"{layer} features of {Path(source).name} on {data}"
    return f.features, f.labels, list(ds.classes), ds if want_images else None, f.indices, what, data


def embedding_map(source: str | os.PathLike, data: str | None, out, *, method: str = "pca", limit: int | None = 2000,
                  thumbnails: int = 0, layer: str = "encoder", seed: int = 0, device="cpu", data_root=None,
                  batch_size: int = 256) -> dict:
    """``instdisc plot-embedding``: the 2-D map of ``source``'s features into the PNG ``out``.

    ``source``: a run folder / exported encoder (then ``data``, a dataset spec, is embedded) or an HDF5 features file
    (``data`` is then needed only for ``thumbnails``). ``limit``: at most that many points, a fixed random subset.
    ``thumbnails``: draw that many images at points spread over the map. Returns :func:`draw_embedding`'s dict plus
    "method". Raises InstdiscError when no point has a label.
    """
    if method not in METHODS:
        raise InstdiscError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if thumbnails < 0:
        raise InstdiscError(f"--thumbnails must be >= 0, got {thumbnails}")
    check_int(limit, "--limit", 1, optional=True)
    check_int(batch_size, "--batch-size", 1)
    check_png_path(out)
    feats, labels, classes, ds, rows, what, where = _features(
        str(source), data, layer=layer, limit=limit, device=device, data_root=data_root, batch_size=batch_size,
        want_images=thumbnails > 0)
    if not (labels >= 0).any():
        raise InstdiscError(f"{where} has no labels (all {len(labels)} points are unlabeled): the map colours points "
                            f"by label; give labelled data")
    x = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)  # (n, D) unit rows
    if method == "pca":
        xy, var = pca(x, k=2)
        axis = (f"PC1 ({100 * var[0]:.1f}% of variance)", f"PC2 ({100 * var[1]:.1f}% of variance)")
    else:
        xy = tsne_2d(x, seed=seed)
        axis = ("t-SNE 1 (no unit)", "t-SNE 2 (no unit)")
    thumbs = {int(i): ds.load_image(int(rows[i])) for i in spread_points(xy, thumbnails)} if thumbnails else None
    title = f"{'PCA' if method == 'pca' else 't-SNE'} map of {len(x)} {what}"
    res = draw_embedding(xy, labels, out, classes=classes, title=title, axis_labels=axis, thumbnails=thumbs)
    res["method"] = method
    return res
