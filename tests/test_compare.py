from instdisc.compare import compare_knn, format_table

from test_evaluation import tiny_run  # noqa: F401  (fixture)


def test_compare_rows_and_table(tiny_run):  # noqa: F811
    root, out = tiny_run
    rows = compare_knn(out, train="fashion-mnist:train", test="fashion-mnist:test", data_root=str(root), k=10)
    assert [r["features"] for r in rows] == ["learned encoder (v)", "learned embedding (z)", "untrained encoder (v)",
                                             "raw pixels"]
    assert rows[-1]["dim"] == 28 * 28
    # The fake classes are bright squares at class-specific places: raw pixels separate them well.
    assert rows[-1]["top1"] > 0.5
    text = format_table(rows, 10, 0.07)
    assert "raw pixels" in text and "%" in text.splitlines()[0]
