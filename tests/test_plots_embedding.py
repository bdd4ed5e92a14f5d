"""instdisc/plots/embedding.py: PCA against a reference and a closed form, t-SNE, the map picture, the sources."""
import h5py
import numpy as np
import pytest

from instdisc.errors import InstdiscError
from instdisc.export.hdf5 import export_features
from instdisc.plots.embedding import (MAP_SIZE, draw_embedding, embedding_map, pca, spread_points, subset_rows,
                                      tsne_2d)

from _plot_helpers import png_stats


def test_pca_matches_svd_reference():
    x = np.random.default_rng(0).normal(size=(50, 8)) * np.arange(1, 9)  # (N, D)
    xy, var = pca(x, k=2)
    xc = x - x.mean(0)
    u, s, vt = np.linalg.svd(xc, full_matrices=False)
    ref = u[:, :2] * s[:2]
    np.testing.assert_allclose(np.abs(xy), np.abs(ref), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(var, s[:2] ** 2 / (s ** 2).sum(), rtol=1e-6)


def test_pca_gram_branch_equals_covariance_branch():
    x = np.random.default_rng(1).normal(size=(6, 40))  # N < D: Gram matrix
    xy, var = pca(x, k=2)
    u, s, _ = np.linalg.svd(x - x.mean(0), full_matrices=False)
    np.testing.assert_allclose(np.abs(xy), np.abs(u[:, :2] * s[:2]), rtol=1e-4, atol=1e-4)
    assert var.sum() <= 1.0 + 1e-9


def test_pca_closed_form_line():
    """Points on the line t * (1, 1, 0) / sqrt 2: PC1 is the position t (centred), explains everything."""
    t = np.array([-2.0, -1.0, 0.0, 1.0, 5.0])
    x = np.outer(t, [1.0, 1.0, 0.0]) / np.sqrt(2)
    xy, var = pca(x, k=2)
    np.testing.assert_allclose(xy[:, 0], t - t.mean(), atol=1e-5)  # sign: largest |coordinate| (5 - 0.6) positive
    np.testing.assert_allclose(xy[:, 1], 0, atol=1e-5)
    np.testing.assert_allclose(var, [1.0, 0.0], atol=1e-9)


@pytest.mark.parametrize("x,match", [(np.ones((4, 3)), "identical"), (np.ones((1, 3)), "at least 2")])
def test_pca_degenerate(x, match):
    with pytest.raises(InstdiscError, match=match):
        pca(x)


def test_tsne_shape_and_seed():
    x = np.random.default_rng(0).normal(size=(40, 10)).astype(np.float32)
    a, b = tsne_2d(x, seed=3), tsne_2d(x, seed=3)
    assert a.shape == (40, 2) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    with pytest.raises(InstdiscError, match="at least 5"):
        tsne_2d(x[:4])


def test_subset_rows_is_the_dataset_limit_rule():
    assert subset_rows(10, None).tolist() == list(range(10)) == subset_rows(10, 50).tolist()
    rows = subset_rows(100, 7)
    assert rows.tolist() == sorted(np.random.default_rng(0).choice(100, 7, replace=False).tolist())
    with pytest.raises(InstdiscError, match="--limit"):
        subset_rows(10, 0)


def test_spread_points_picks_the_corners_after_the_centre():
    xy = np.array([[0, 0], [10, 10], [10, -10], [-10, 10], [-10, -10], [1, 1]], dtype=np.float32)
    got = spread_points(xy, 5)
    assert got[0] == 0 and set(got[1:].tolist()) == {1, 2, 3, 4}
    assert len(spread_points(xy, 99)) == 6 and len(spread_points(xy, 0)) == 0


def test_draw_embedding_size_and_not_blank(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    xy = rng.normal(size=(200, 2))
    labels = np.arange(200) % 4 - 1  # -1 = unlabeled, 0..2 classes
    thumbs = {0: Image.new("L", (28, 28), 200), 5: Image.new("RGB", (32, 32), (0, 90, 200))}
    res = draw_embedding(xy, labels, tmp_path / "m.png", classes=["a", "b", "c"], thumbnails=thumbs, title="t")
    size, var = png_stats(tmp_path / "m.png")
    assert size == MAP_SIZE == res["size"] == (1200, 900) and var > 100
    assert (res["n"], res["labelled"], res["classes"]) == (200, 150, 3)
    with pytest.raises(InstdiscError, match="xy"):
        draw_embedding(xy[:, :1], labels, tmp_path / "bad.png")


@pytest.fixture(scope="module")
def h5(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("h5") / "f.h5"
    export_features(run[0], "fashion-mnist:test", out, data_root=str(run[1]))
    return out


def test_map_of_a_features_file(h5, run, tmp_path):
    res = embedding_map(h5, None, tmp_path / "a.png", limit=25)
    assert (res["n"], res["labelled"], res["classes"], res["method"]) == (25, 25, 10, "pca")
    assert png_stats(tmp_path / "a.png")[0] == MAP_SIZE
    res = embedding_map(h5, "fashion-mnist:test", tmp_path / "b.png", thumbnails=4, data_root=str(run[1]),
                        method="tsne")
    assert res["n"] == 40 and png_stats(tmp_path / "b.png")[1] > 100


def test_map_of_a_model_on_a_dataset(run, tmp_path):
    res = embedding_map(run[0], "fashion-mnist:test", tmp_path / "m.png", limit=30, thumbnails=3,
                        data_root=str(run[1]), layer="embedding")
    assert (res["n"], res["labelled"]) == (30, 30)
    assert png_stats(tmp_path / "m.png")[0] == MAP_SIZE


def test_features_without_labels_is_an_error(h5, tmp_path):
    import shutil

    unl = tmp_path / "unlabeled.h5"
    shutil.copy(h5, unl)
    with h5py.File(unl, "r+") as f:
        f["labels"][...] = -1
    with pytest.raises(InstdiscError, match="has no labels"):
        embedding_map(unl, None, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_source_errors(h5, run, tmp_path):
    with pytest.raises(InstdiscError, match="--thumbnails needs DATA"):
        embedding_map(h5, None, tmp_path / "x.png", thumbnails=2)
    with pytest.raises(InstdiscError, match="DATA .* is needed"):
        embedding_map(run[0], None, tmp_path / "x.png")
    with pytest.raises(InstdiscError, match="not the dataset the features were exported from"):
        embedding_map(h5, "fashion-mnist:train", tmp_path / "x.png", thumbnails=2, data_root=str(run[1]))
    with pytest.raises(InstdiscError, match="--method"):
        embedding_map(h5, None, tmp_path / "x.png", method="umap")
