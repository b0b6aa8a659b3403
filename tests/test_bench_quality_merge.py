"""``bench/quality.py --merge``: runs of separate processes (one seed each) gathered into one spread."""

from __future__ import annotations

import importlib.util
import json

import pytest

from support import REPO


def _quality():
    spec = importlib.util.spec_from_file_location("quality_bench", REPO / "bench" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(seed: int, ndcg: float, epochs: int = 30) -> dict:
    config = {"trainer": {"seed": seed, "max_epochs": epochs, "refit": True}, "tracking": {"tracking_uri": f"sqlite:///{seed}"}}
    metrics = {"test/ndcg_10": ndcg, "test/hr_10": 2 * ndcg, "test_unmasked/ndcg_10": ndcg / 2, "test_unmasked/hr_10": ndcg}
    return {"config": config, "epochs": epochs, "wall_s": 100.0, "seconds_per_epoch": 3.0, "metrics": metrics}


def _file(tmp_path, name: str, result: dict) -> str:
    path = tmp_path / name
    path.write_text(json.dumps({"command": f"quality.py {name}", "results": {"beauty": result}}))
    return str(path)


def test_single_and_multi_seed_files_merge_into_one_summary(tmp_path):
    a = _file(tmp_path, "a.json", _run(42, 0.06))  # a one-seed file holds the run itself
    b = _file(tmp_path, "b.json", {"seeds": [43, 44], "runs": [_run(43, 0.07), _run(44, 0.08)]})
    out = tmp_path / "spread.json"
    assert _quality().main(["--datasets", "beauty", "--merge", a, b, "--note", "30 epochs", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    beauty = report["results"]["beauty"]
    assert report["note"] == "30 epochs"
    assert beauty["seeds"] == [42, 43, 44]
    assert [s["command"] for s in beauty["sources"]] == ["quality.py a.json", "quality.py b.json", "quality.py b.json"]
    assert [p["test/ndcg_10"] for p in beauty["per_seed"]] == [0.06, 0.07, 0.08]
    st = beauty["summary"]["test/ndcg_10"]
    assert st["mean"] == pytest.approx(0.07) and st["sd"] == pytest.approx(0.01)
    assert (st["min"], st["max"], st["n"]) == (0.06, 0.08, 3)
    assert st["target"] == 0.0672 and st["mean_met"] is True
    assert beauty["summary"]["test_unmasked/hr_10"]["mean"] == pytest.approx(0.07)


def test_runs_of_another_protocol_a_repeated_seed_or_a_cut_file_are_refused(tmp_path):
    q = _quality()
    base = _file(tmp_path, "a.json", _run(42, 0.06))
    other = _file(tmp_path, "b.json", _run(43, 0.07, epochs=20))
    with pytest.raises(ValueError, match="trainer.max_epochs"):
        q.merge([base, other], "beauty")
    with pytest.raises(ValueError, match="seed appears twice"):
        q.merge([base, base], "beauty")
    cut = _file(tmp_path, "c.json", {"seeds": [43], "runs": [_run(43, 0.07)], "partial": True})
    with pytest.raises(ValueError, match="partial"):
        q.merge([base, cut], "beauty")
    with pytest.raises(ValueError, match="no 'lastfm' result"):
        q.merge([base], "lastfm")
