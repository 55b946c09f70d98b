"""benchmarks/fidelity/repeat_runs.py on the recorded GPU W3A3 runs: the first folder's record wins where a run was
recorded twice, the other fills in, and each repeat is set beside its twin; an empty folder is refused by name."""
import json
import shutil
from pathlib import Path

import pytest

from scripts import load_script

ROOT = Path(__file__).resolve().parent.parent
RECORDED = ROOT / "benchmarks/fidelity/results/gpu"


def _folder(path: Path, call: int, names):
    path.mkdir(parents=True)
    for name in names:
        shutil.copy(RECORDED / f"w3a3_call{call}/runs/{name}.json", path)
    return path


def _rel_l2(call: int, name: str) -> float:
    return json.loads((RECORDED / f"w3a3_call{call}/runs/{name}.json").read_text())["fidelity"]["rel_l2"]


def test_first_call_wins_the_other_fills_in_and_repeats_are_paired(tmp_path):
    first = _folder(tmp_path / "c1", 1, ["w3a3_ptq_s0", "w3a3_lsq_s0", "w3a3_lsq_s1"])
    second = _folder(tmp_path / "c2", 2, ["w3a3_ptq_s0", "w3a3_lsq_s0", "w3a3_qvgen_keep_aux_s0"])
    out = tmp_path / "merged"
    assert load_script("benchmarks/fidelity/repeat_runs.py").main(
        ["--runs", str(first), str(second), "--out", str(out)]) == 0
    runs = {(r["method"], r["seed"]): r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert sorted(runs) == [("lsq", 0), ("lsq", 1), ("ptq", 0), ("qvgen_keep_aux", 0)]
    assert runs[("lsq", 0)]["fidelity"]["rel_l2"] == _rel_l2(1, "w3a3_lsq_s0")
    assert runs[("qvgen_keep_aux", 0)]["fidelity"]["rel_l2"] == _rel_l2(2, "w3a3_qvgen_keep_aux_s0")
    rows = [line for line in (out / "repeats.md").read_text().splitlines()
            if line.startswith("| W3A3") and line.count("|") == 11]   # the repeats table, not the pooled one
    assert len(rows) == 2 and "| PTQ only | 0 |" in rows[0]
    spread = abs(_rel_l2(2, "w3a3_lsq_s0") - _rel_l2(1, "w3a3_lsq_s0"))
    assert f"| {spread:.4f} |" in rows[1] and spread > 0.01    # the same seed trained twice on the GPU
    assert rows[0].count("| 0.0000 |") == 1                    # PTQ: no spread
    assert (out / "rel_l2.png").exists() and (out / "grad_norm.png").exists()


def test_a_folder_without_records_is_refused_by_name(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="empty holds no run records"):
        load_script("benchmarks/fidelity/repeat_runs.py").main(["--runs", str(tmp_path / "empty"), "--out",
                                                                str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_run_recorded_with_other_settings_is_not_a_repeat(tmp_path):
    first = _folder(tmp_path / "c1", 1, ["w3a3_lsq_s0"])
    second = _folder(tmp_path / "c2", 2, ["w3a3_lsq_s0"])
    record = json.loads((second / "w3a3_lsq_s0.json").read_text())
    record["config"]["train"]["lr"] *= 3
    record["config"]["train"]["save_dir"] = "elsewhere"     # where it saved is no setting
    (second / "w3a3_lsq_s0.json").write_text(json.dumps(record))
    with pytest.raises(SystemExit, match="not a repeat of the run in .*c1: they differ in train.lr$"):
        load_script("benchmarks/fidelity/repeat_runs.py").main(["--runs", str(first), str(second), "--out",
                                                                str(tmp_path / "out")])


def test_a_copied_record_is_no_repeat_and_one_measured_otherwise_is_refused(tmp_path, capsys):
    first = _folder(tmp_path / "c1", 1, ["w3a3_lsq_s0", "w3a3_lsq_s1"])
    second = _folder(tmp_path / "c2", 1, ["w3a3_lsq_s0"])      # the next call's archive: the same record again
    shutil.copy(RECORDED / "w3a3_call2/runs/w3a3_lsq_s1.json", second)
    out = tmp_path / "merged"
    assert load_script("benchmarks/fidelity/repeat_runs.py").main(
        ["--runs", str(first), str(second), "--out", str(out)]) == 0
    assert "w3a3_lsq_s0.json: the record of" in capsys.readouterr().out
    rows = [line for line in (out / "repeats.md").read_text().splitlines()
            if line.startswith("| W3A3") and line.count("|") == 11]   # the repeats table, not the pooled one
    assert len(rows) == 1 and "| 1 |" in rows[0]                 # seed 1 alone was trained twice
    record = json.loads((second / "w3a3_lsq_s1.json").read_text())
    record["fidelity"]["samples"] = 8
    (second / "w3a3_lsq_s1.json").write_text(json.dumps(record))
    with pytest.raises(SystemExit, match="they differ in fidelity.samples$"):
        load_script("benchmarks/fidelity/repeat_runs.py").main(["--runs", str(first), str(second), "--out",
                                                                str(tmp_path / "out2")])


def test_a_field_added_after_a_record_counts_as_what_that_run_did(tmp_path):
    first = _folder(tmp_path / "c1", 1, ["w3a3_lsq_s1"])
    second = _folder(tmp_path / "c2", 2, ["w3a3_lsq_s1"])
    record = json.loads((first / "w3a3_lsq_s1.json").read_text())
    assert record["config"]["quant"].pop("decay_moments") == "reset"     # as a record from before the field
    (first / "w3a3_lsq_s1.json").write_text(json.dumps(record))
    assert load_script("benchmarks/fidelity/repeat_runs.py").main(
        ["--runs", str(first), str(second), "--out", str(tmp_path / "out")]) == 0
    other = json.loads((second / "w3a3_lsq_s1.json").read_text())
    other["config"]["quant"]["decay_moments"] = "keep"
    (second / "w3a3_lsq_s1.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="they differ in quant.decay_moments$"):
        load_script("benchmarks/fidelity/repeat_runs.py").main(["--runs", str(first), str(second), "--out",
                                                                str(tmp_path / "out2")])


def test_pooled_trainings_and_their_permutation_p(tmp_path):
    script = load_script("benchmarks/fidelity/repeat_runs.py")
    assert script.permutation_p([1, 2, 3], [4, 5, 6]) == pytest.approx(2 / 20)   # the two extreme splits of 20
    assert script.permutation_p([1, 2], [1, 2]) == 1.0
    assert 0.2 < script.permutation_p(list(range(12)), list(range(1, 13)), limit=2000) < 1.0   # sampled splits
    assert script.permutation_p([0.0] * 8, [1.0] * 8, limit=100) == pytest.approx(1 / 101)   # never 0 when sampled
    # labels exchanged within a seed: of the 4 splits, the observed one and its mirror are as far apart
    assert script.within_seed_permutation_p([([1.0], [2.0]), ([3.0], [4.0])]) == pytest.approx(0.5)
    first = _folder(tmp_path / "c1", 1, ["w3a3_lsq_s0", "w3a3_lsq_s1", "w3a3_qvgen_s0", "w3a3_ptq_s0"])
    second = _folder(tmp_path / "c2", 2, ["w3a3_lsq_s0", "w3a3_qvgen_s0"])
    out = tmp_path / "merged"
    assert script.main(["--runs", str(first), str(second), "--out", str(out)]) == 0
    pooled = [line for line in (out / "repeats.md").read_text().splitlines() if line.count("|") == 8]
    lsq = [_rel_l2(1, "w3a3_lsq_s0"), _rel_l2(1, "w3a3_lsq_s1"), _rel_l2(2, "w3a3_lsq_s0")]
    qvgen = [_rel_l2(1, "w3a3_qvgen_s0"), _rel_l2(2, "w3a3_qvgen_s0")]
    assert any(line.startswith("| W3A3 | LSQ QAT + KD (no Phi) | 3 |") for line in pooled)
    row = next(line for line in pooled if "rank decay" in line)
    ratio = sum(qvgen) / 2 / (sum(lsq) / 3)
    # '-' within seeds: LSQ's seed 1 has no rank-decay twin
    assert f"| 2 | " in row and f"| {ratio:.3f} | {script.permutation_p(qvgen, lsq):.3f} | - |" in row
    assert not any("PTQ" in line for line in pooled)          # nothing trained: not pooled
