"""Comparing two studies (flopmatch.report.compare): the two-variance test's calibration on simulated studies
with known truth, the cell and table logic on synthetic verdicts, and the whole command on two tiny studies."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flopmatch.errors import UserError
from flopmatch.report.compare import cell_changes, study_differences, table_changes, unrecorded
from flopmatch.report.stats import pooled_test, pooled_variance, two_variance_test
from flopmatch.report.verdicts import CONFIDENT, NO_DIFF, Cell, Noise, Verdicts

ALPHA = 0.05


def _rate(pvalues) -> float:
    p = np.asarray(pvalues, float)
    return float(np.mean(np.minimum(1.0, 2 * np.minimum(p, 1 - p)) <= ALPHA))


def _study(rng, sd: float, seeds: int, floor_cells: int, shift: float = 0.0):
    """One simulated study's cell: ``seeds`` values with mean ``shift`` and its pooled seed variance from
    ``floor_cells`` other cells of 3 seeds each (the report pools seed variance over the floor cells)."""
    var, df = pooled_variance([rng.normal(0, sd, 3) for _ in range(floor_cells)])
    return rng.normal(shift, sd, seeds), var, df


def test_two_variance_test_is_calibrated_with_unequal_noise():
    """No true difference, one seed per side, seed sds 0.05 and 0.15 (pooled over 3 and 2 cells): the two-sided
    rejection rate at 0.05 is 0.05 +- 0.02; a pooled test that wrongly uses the base study's variance alone is not."""
    rng = np.random.default_rng(11)
    right, wrong = [], []
    for _ in range(3000):
        a, va, da = _study(rng, 0.15, 1, 2)
        b, vb, db = _study(rng, 0.05, 1, 3)
        right.append(two_variance_test(a, b, va, da, vb, db).p)
        wrong.append(pooled_test(a, b, vb, db).p)
    assert 0.03 <= _rate(right) <= 0.07
    assert _rate(wrong) > 0.15


def test_two_variance_test_detects_a_known_shift_and_reduces_to_the_pooled_test():
    """A 3-sd shift at 3 seeds per side is found most of the time; with one variance on both sides the se equals
    pooled_test's and the df lies between min(df) and their sum."""
    rng = np.random.default_rng(12)
    hits = []
    for _ in range(500):
        a, va, da = _study(rng, 0.1, 3, 3, shift=-0.3)
        b, vb, db = _study(rng, 0.1, 3, 3)
        hits.append(two_variance_test(a, b, va, da, vb, db).p)
    assert _rate(hits) > 0.8
    r, ref = two_variance_test([1.0, 2.0], [3.0], 0.5, 4, 0.5, 6), pooled_test([1.0, 2.0], [3.0], 0.5, 4)
    assert r.se == pytest.approx(ref.se) and 4 <= r.df <= 10 and r.estimate == pytest.approx(-1.5)
    assert two_variance_test([1.0], [2.0], None, None, 0.5, 4).method == "none"
    with pytest.raises(UserError):
        two_variance_test([1.0], [2.0], -1.0, 3, 0.5, 4)


def _verdicts(values: dict, var: float | None, table: list[dict] | None = None) -> Verdicts:
    """Verdicts with kid and prompt cells {(paradigm, budget): [log values]} and seed noise ``var`` (10 df)."""
    noise = Noise("seeds", var, 10.0, 3) if var is not None else Noise("evaluation")
    cells = {p: {k: Cell(k[0], k[1], 1, np.asarray(v, float), np.full(len(v), 0.01), False, 1) for k, v in values.items()}
             for p in ("kid", "prompt")}
    return Verdicts({"kid": noise, "prompt": noise}, cells, table=table or [])


def test_cell_changes_find_the_moved_cell_and_only_it():
    """Base and other equal except diffusion at 1e12, 10x higher in the other study: that cell is 'higher
    (confident)', the rest 'no difference detected'; cells in one study only are not compared."""
    base = {("diffusion", 1e12): [0.0, 0.01], ("masked", 1e12): [0.2, 0.21], ("masked", 2e12): [0.1]}
    other = {("diffusion", 1e12): [math.log(10), math.log(10) + 0.01], ("masked", 1e12): [0.2, 0.22]}
    out = cell_changes(_verdicts(base, 0.01), _verdicts(other, 0.01), ("a", "b"))
    rows = {(r["paradigm"], r["budget"]): r for r in out["kid"]}
    assert set(rows) == {("diffusion", 1e12), ("masked", 1e12)}
    d = rows[("diffusion", 1e12)]
    assert d["label"] == CONFIDENT and d["direction"] == "higher" and d["ratio"] == pytest.approx(10, rel=0.01)
    assert rows[("masked", 1e12)]["label"] == NO_DIFF and rows[("masked", 1e12)]["direction"] == ""
    assert d["p_adj"] >= d["p"]


def test_cell_changes_without_seed_noise_are_at_most_suggestive():
    """One study without seed variance: evaluation noise stands in, so even a 10x change is not 'confident'."""
    base, other = {("diffusion", 1e12): [0.0]}, {("diffusion", 1e12): [math.log(10)]}
    r = cell_changes(_verdicts(base, None), _verdicts(other, 0.01), ("a", "b"))["kid"][0]
    assert r["noise"] == "evaluation" and r["label"] != CONFIDENT and r["direction"] == "higher"


def _cell(budget, need, choice, label, tied=()):
    return {"budget": budget, "need": need, "choice": choice, "label": label, "tied": list(tied)}


def test_table_changes_classify_same_changed_partial_and_missing():
    vb = _verdicts({}, 0.01, [_cell(1e12, "image quality", "masked", "confident"),
                              _cell(1e12, "prompt following", "masked", "confident"),
                              _cell(1e12, "latency", None, NO_DIFF, ("masked", "diffusion")),
                              _cell(1e12, "throughput", None, "not measured")])
    vo = _verdicts({}, 0.01, [_cell(1e12, "image quality", "diffusion", "suggestive"),
                              _cell(1e12, "prompt following", "masked", "suggestive"),
                              _cell(1e12, "latency", "masked", "confident"),
                              _cell(1e12, "throughput", "autoregressive", "confident")])
    vb.table.append(_cell(2e12, "latency", None, NO_DIFF, ("masked", "diffusion")))
    vo.table.append(_cell(2e12, "latency", None, NO_DIFF, ("masked", "diffusion", "autoregressive")))
    status = {t["need"]: t["status"] for t in table_changes(vb, vo) if t["budget"] == 1e12}
    assert [t["status"] for t in table_changes(vb, vo) if t["budget"] == 2e12] == ["no pick in either, with other ties"]
    assert status == {"image quality": "changed", "prompt following": "same", "latency": "decided in other only",
                      "throughput": "–"}
    # one study lacks a paradigm: its cells rank another set of paradigms, so their answers are not compared
    vb.table.append(dict(_cell(4e12, "image quality", "diffusion", "confident"), ranked=["diffusion", "masked"]))
    vo.table.append(dict(_cell(4e12, "image quality", None, NO_DIFF, ("masked",)), ranked=["masked", "autoregressive"]))
    (apart,) = [t["status"] for t in table_changes(vb, vo) if t["budget"] == 4e12]
    assert apart == "not comparable: paradigms differ (diffusion, masked vs autoregressive, masked)"


def test_long_settings_are_cut_between_numbers():
    from flopmatch.report.compare import _short

    budgets = [7e10, 1.7e11, 4.2e11, 1e12, 2.5e12, 6e12, 1.5e13, 3.7e13, 9e13, 2.2e14, 5.5e14, 1.4e15, 3.4e15]
    text = _short(budgets)
    assert text.startswith("[7e+10, 1.7e+11, 4.2e+11, 1e+12, 2.5e+12") and text.endswith(", ...]") and len(text) <= 80
    assert all(part in {f"{b:.3g}" for b in budgets} for part in text[1:-6].split(", "))  # whole numbers only
    assert _short(2.5e12) == "2.5e+12" and _short("tiny") == "tiny"


def test_two_different_settings_never_read_the_same():
    """Two different values of a setting are shown apart, each in <= 80 characters: close numbers get more digits, and
    long lists that differ past the cut are shown from their first difference."""
    from flopmatch.report.compare import _shorts

    budgets = [float(f"{10 ** (10 + i / 4):.2g}") for i in range(20)]
    pairs = [(3e-4, 3.0001e-4), (0.1, 0.1 + 2 ** -55), (budgets, budgets[:-1] + [9.9e15]), (budgets, budgets[:-1]),
             (budgets, budgets[:5] + [1.0] + budgets[6:]), ([1, 2], [1, 3]), ("x", "y"), (2.5e12, "(not set)"),
             ("folder:/data/" + "x" * 90 + "/set_A", "folder:/data/" + "x" * 90 + "/set_B"), (["y" * 100 + "1"], ["y" * 100 + "2"])]
    for a, b in pairs:
        got = _shorts(a, b)
        assert got[0] != got[1] and all(len(t) <= 80 for t in got), (a, b, got)
    assert _shorts(budgets, budgets[:-1] + [9.9e15])[1].endswith("9.9e+15]")  # the differing item, at %.3g


def test_study_differences_list_changed_fields_and_overrides(tmp_path):
    from flopmatch.files import atomic_write_json

    a, b = tmp_path / "a", tmp_path / "b"
    atomic_write_json(a / "study.json", {"tokenizer": "learned", "overrides": ["train.lr=2e-3", "data.num_train=100"],
                                         "n_boot": 100})
    atomic_write_json(b / "study.json", {"tokenizer": "weight-free", "overrides": ["train.lr=2e-3",
                                         "train.schedule=constant"], "n_boot": 50})
    rows = study_differences(a, b)
    assert ["tokenizer", "learned", "weight-free"] in rows
    assert ["--set train.schedule", "(not set)", "constant"] in rows
    assert ["--set data.num_train", "100", "(not set)"] in rows
    assert not any(r[0] == "n_boot" for r in rows)  # a report setting: not part of what the study measures
    atomic_write_json(b / "study.json", {"tokenizer": "learned", "overrides": ["train.lr=2e-3", "data.num_train=100"],
                                         "first_seed": -1})  # written by a newer flopmatch: one more key
    assert study_differences(a, b) == [] and unrecorded(a, b) == ["first_seed"]


def _synthetic(root, rng_seed: int, diffusion_scale: float = 1.0):
    """A 3-paradigm, 1-depth, 3-budget, 3-seed synthetic study (test_report's fake runs) with diffusion's FID law
    (and so its KID, FID / 1000) scaled by ``diffusion_scale``."""
    from test_report import FID_LAW, LOSS_LAW, PROMPT_ERR_LAW, make_study

    E, A, alpha = FID_LAW["diffusion"]
    fid = {**FID_LAW, "diffusion": (E * diffusion_scale, A * diffusion_scale, alpha)}
    return make_study(root, depths=(2,), budgets=(1e12, 1e13, 1e14), seeds=(0, 1, 2), noise=0.03, rng_seed=rng_seed,
                      laws={"fid": fid, "prompt": PROMPT_ERR_LAW, "loss": LOSS_LAW})


def test_compare_two_studies_end_to_end(tmp_path, capsys):
    """Known truth: the other study's diffusion has 3x the KID, everything else is the same law with new noise.
    Every diffusion KID cell moves up x3 (confident); no other paradigm's KID and no prompt cell moves; the
    quality recommendation changes where diffusion led; the files are written and the CLI prints the change."""
    from flopmatch.cli import main
    from flopmatch.report.compare import compare_studies

    base = _synthetic(tmp_path / "base", 0)
    other = _synthetic(tmp_path / "other", 1, diffusion_scale=3.0)
    out = compare_studies(base, other, tmp_path / "cmp")
    kid = out["changes"]["kid"]
    assert {(r["paradigm"], r["budget"]) for r in kid} == {(p, b) for p in ("diffusion", "masked", "autoregressive")
                                                           for b in (1e12, 1e13, 1e14)}
    for r in kid:
        if r["paradigm"] == "diffusion":
            assert r["direction"] == "higher" and r["label"] == CONFIDENT and 2.5 < r["ratio"] < 3.6
        else:
            assert r["label"] != CONFIDENT and 0.85 < r["ratio"] < 1.15  # Holm: no family-wise false positive
    assert not any(r["label"] == CONFIDENT for r in out["changes"]["prompt"])
    quality = {t["budget"]: t for t in out["table"] if t["need"] == "image quality"}
    led = [t for t in quality.values() if t["base"].startswith("diffusion")]
    assert led and all(t["status"] == "changed" and not t["other"].startswith("diffusion") for t in led)
    for name in ("compare.html", "compare.md", "compare.json", "compare_figures/changes.png"):
        assert (tmp_path / "cmp" / name).stat().st_size > 0
    timing_moved = any(t["need"] in ("latency", "throughput") and not t["status"].startswith("same") and t["status"] != "–"
                       for t in out["table"])
    assert ("Timings do not depend on training" in (tmp_path / "cmp" / "compare.md").read_text()) == timing_moved
    assert main(["compare", str(base), str(other), "--out", str(tmp_path / "cmp2")]) == 0
    printed = capsys.readouterr().out
    assert "KID: 3 of 9 (paradigm, budget) cells move (confident, Holm-corrected); diffusion at 1e+12 x" in printed
    assert (tmp_path / "cmp2" / "compare.html").read_bytes() == (tmp_path / "cmp" / "compare.html").read_bytes()


def test_compare_refuses_bad_input_with_one_line(tmp_path, capsys):
    """Not a study, the same study twice, or two studies without a common cell: exit 2, one line, nothing written."""
    from flopmatch.cli import main

    base = _synthetic(tmp_path / "base", 0)
    assert main(["compare", str(base), str(tmp_path / "nothing")]) == 2
    assert main(["compare", str(base), str(base)]) == 2
    from test_report import make_study

    elsewhere = make_study(tmp_path / "elsewhere", paradigms=("masked",), depths=(2,), budgets=(1e15,), seeds=(0,))
    assert main(["compare", str(base), str(elsewhere)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("flopmatch: error:") for line in err)
    assert not (elsewhere / f"compare_vs_{base.name}").exists()
