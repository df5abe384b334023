"""``leanopt speed``: the bookkeeping of the optimizer-step benchmark (a tiny parameter set)."""

from __future__ import annotations

import pytest

from leanopt.bench.speed import format_table, run_speed


def test_speed_rows_floor_and_ratios():
    result = run_speed("tiny", only=["torch AdamW (fused)", "leanopt sgd-sai"], steps=2, warmup=1, repeats=1, threads=1, log=lambda s: None)
    rows = {r["name"]: r for r in result["rows"]}
    adamw, sai = rows["torch AdamW (fused)"], rows["leanopt sgd-sai"]
    # bytes a step must move, per fp32 parameter: p read+write, g read, state read+write
    assert adamw["floor_bytes_per_param"] == pytest.approx(4 * (3 + 2 * 2))
    assert sai["floor_bytes_per_param"] == pytest.approx(4 * (3 + 2 * 1), rel=0.01)
    assert adamw["state_bytes_per_param_byte"] == pytest.approx(2.0)
    assert adamw["ratio_to_fused_adamw"] == pytest.approx(1.0)
    for r in (adamw, sai):
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        # the median of per-step ratios (each step against the bandwidth measured before it)
        assert r["ratio_to_floor"] == pytest.approx(r["median_ms"] / r["floor_ms"], rel=0.5)
        assert r["bandwidth_best_gbs"] >= r["bandwidth_copy_gbs"] > 0
        assert r["peak_extra_frac"] is not None and r["peak_extra_frac"] >= 0
    table = format_table(result)
    assert "torch AdamW (fused)" in table and "x floor" in table


def test_unknown_model_or_filter():
    with pytest.raises(ValueError, match="unknown model"):
        run_speed("gpt5")
    with pytest.raises(ValueError, match="no implementation"):
        run_speed("tiny", only=["nothing-like-this"])
