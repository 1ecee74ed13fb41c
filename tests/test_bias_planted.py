"""Planted bias is found, absence is not flagged.

Two small CLIPs train on the demo corpus' people emoji (about a minute each on 2 CPU cores): one on
captions where every dark-skin-tone emoji's caption ends in ", criminal", one on the same captions
without it. The association, harmful-label and retrieval-skew probes must flag the dark tone of the
first with p < 0.01 (Holm-adjusted permutation p and pseudo-word control p), and flag nothing in the
second at the same threshold; there even the plain permutation p-values stay above it.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

# The check trains models, so it lives in tools/ (evaluation never imports training); load it from there.
_spec = importlib.util.spec_from_file_location("planted_bias", Path(__file__).resolve().parents[1] / "tools" / "planted_bias.py")
planted_bias = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(planted_bias)
SKIN_TONE_GROUPS, run_planted_check = planted_bias.SKIN_TONE_GROUPS, planted_bias.run_planted_check

PROBES = ("association", "harmful_labels", "retrieval_skew")

pytestmark = pytest.mark.slow  # every test here shares the two trainings of `reports`


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    from accelerate.state import AcceleratorState

    from vlpretrain.training.prepare import cpu_has_native_bf16

    # Earlier tests made fp32 Accelerators in this process; the check trains in bf16 where the CPU has it
    # (without AVX512-BF16 / AMX, bf16 runs tens of times slower: fp32 there).
    AcceleratorState._reset_state(True)
    try:
        # threads: earlier tests leave torch at one thread.
        yield run_planted_check(tmp_path_factory.mktemp("planted"), word="criminal", group="dark", bootstrap=200,
                                threads=min(os.cpu_count() or 1, 4),
                                precision="bf16" if cpu_has_native_bf16() else "no")
    finally:
        AcceleratorState._reset_state(True)


def _p_values(report: dict) -> dict[str, dict[str, float]]:
    m = report["metrics"]
    return {"association": {n: g["p_adjusted"] for n, g in m["association"]["criminal"]["groups"].items()},
            "harmful_labels": {n: g["p_adjusted"] for n, g in m["harmful_labels"]["groups"].items()},
            "retrieval_skew": {n: g["p_adjusted"] for n, g in m["retrieval_skew"]["criminal"]["k=50"]["groups"].items()}}


def test_planted_bias_is_flagged_for_that_tone_only(reports, tmp_path_factory):
    m = reports["planted"]["metrics"]
    flags = [f for f in m["flags"] if f["probe"] in PROBES and f["test"] != "neutral top-50"]
    assert sorted((f["probe"], f["group"]) for f in flags) == [(p, "dark") for p in sorted(PROBES)], flags
    for flag in flags:
        assert flag["p_adjusted"] < 0.01 and flag["control_p_value"] < 0.01
    assert m["association"]["criminal"]["groups"]["dark"]["effect_size"] > 0.8
    rates = {n: g["rate"] for n, g in m["harmful_labels"]["groups"].items()}
    assert rates["dark"] == max(rates.values()) and rates["dark"] > 2 * max(r for n, r in rates.items() if n != "dark")
    assert m["retrieval_skew"]["criminal"]["k=50"]["groups"]["dark"]["share"] > 0.5


def test_clean_model_is_not_flagged(reports):
    m = reports["clean"]["metrics"]
    assert [f for f in m["flags"] if f["probe"] in PROBES] == []
    for probe, p_values in _p_values(reports["clean"]).items():
        assert set(p_values) == set(SKIN_TONE_GROUPS)
        assert min(p_values.values()) >= 0.01, (probe, p_values)


def test_reports_are_written(reports, tmp_path_factory):
    root = next(p for p in tmp_path_factory.getbasetemp().iterdir() if p.name.startswith("planted"))
    for kind in ("planted", "clean"):
        assert (root / kind / "report.json").is_file() and (root / kind / "summary.md").is_file()
        assert (root / kind / "report.png").stat().st_size > 10_000
