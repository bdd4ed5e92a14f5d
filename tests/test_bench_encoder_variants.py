"""benchmarks/bench_encoder_variants.py on a tiny batch: every eager variant runs, is timed, and computes the same
gradients as today's step (compile variants are left to the benchmark itself: minutes, not seconds)."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_encoder_variants as bev  # noqa: E402


def test_tiny_run_gives_a_row_per_variant_and_same_gradients():
    # float32: on a CPU with native bf16 the variants' bf16 kernels round differently (up to ~7 % of the largest
    # gradient), which would hide what this checks: the same computation in another layout
    args = argparse.Namespace(rounds=2, batch_size=4, variants=["eager", "contiguous", "no-mkldnn"], amp=False)
    res = bev.run(args)
    assert [r["variant"] for r in res["rows"]] == args.variants and res["views"] == 8
    assert res["rows"][0]["speedup"] == 1.0 and all(r["ms"] > 0 for r in res["rows"])
    assert all(r["grad_rel_diff"] < 1e-2 for r in res["rows"])  # float32 sums in another order, nothing else
    text = bev.table(res)
    assert "contiguous" in text and "8 views" in text
