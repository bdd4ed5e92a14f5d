import pytest
import torch

from instdisc.compare import compare_knn, format_table

from test_evaluation import tiny_run  # noqa: F401  (fixture)


def test_compare_rows_and_table(tiny_run):  # noqa: F811
    """Each row equals weighted kNN top-1 / top-5 and 1-NN computed here from the definition (float64) on features
    computed directly: the checkpoint's encoder and head, the seeded untrained encoder, and the pixels in [0, 1]."""
    import _reference as ref
    from instdisc.data import build_dataset
    from instdisc.training import TrainConfig
    from instdisc.method import build_seeded_model

    root, out = tiny_run
    rows = compare_knn(out, train="fashion-mnist:train", test="fashion-mnist:test", data_root=str(root), k=10)
    assert [r["features"] for r in rows] == ["learned encoder (v)", "learned embedding (z)", "untrained encoder (v)",
                                             "raw pixels"]
    ckpt, enc, head = ref.load_parts(out)
    d = ckpt["data"]
    untrained = build_seeded_model(TrainConfig.from_dict(ckpt["config"]), n_data=d["n"], in_channels=d["channels"],
                                   image_size=d["image_size"]).encoder.eval()
    assert any(not torch.equal(a, b) for a, b in zip(untrained.parameters(), enc.parameters()))
    train_ds = build_dataset("fashion-mnist:train", data_root=str(root))
    test_ds = build_dataset("fashion-mnist:test", data_root=str(root))
    xg, xq = ref.eval_inputs(train_ds, d["mean"], d["std"]), ref.eval_inputs(test_ds, d["mean"], d["std"])
    fns = [enc, lambda x: head(enc(x)), untrained, None]
    for row, fn in zip(rows, fns):
        if fn is None:  # raw pixels in [0, 1], flattened
            g = train_ds.array.flatten(1).double().numpy() / 255
            q = test_ds.array.flatten(1).double().numpy() / 255
        else:
            g, q = ref.encode(fn, xg), ref.encode(fn, xq)
        assert row["dim"] == g.shape[1], row["features"]
        assert ref.label_margin(g, train_ds.labels, q) > 1e-5, row["features"]  # well posed in float32
        want = ref.weighted_knn(g, train_ds.labels, q, test_ds.labels, k=10, tau=0.07)
        for key in ("top1", "top5", "nn1"):
            assert row[key] == pytest.approx(want[key], abs=1e-12), (row["features"], key)
    assert [r["dim"] for r in rows] == [16, 8, 16, 28 * 28]
    text = format_table(rows, 10, 0.07)
    assert "raw pixels" in text and "%" in text.splitlines()[0]
    assert f"{100 * rows[-1]['top1']:.2f}" in text.splitlines()[-1]
