"""What a user sees: a log file gets one line per epoch and nothing from third-party libraries."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from support import REPO, tiny_overrides
from towerline.cli import main

TOWERLINE_LINE = re.compile(r"^\d\d:\d\d:\d\d (INFO|WARNING) towerline\.[\w.]+: ")
EPOCH_LINE = re.compile(r"epoch (\d+)/2  loss \d+\.\d{4}  valid NDCG@10 \d\.\d{4}  \d+\.\d s$")


def test_train_into_a_log_writes_one_line_per_epoch_and_no_library_noise(tmp_path):
    args = [sys.executable, "-m", "towerline.cli", "train", "--config", str(REPO / "configs" / "synthetic.yaml"),
            "--out", str(tmp_path / "run"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    for o in tiny_overrides() + ["trainer.limit_train_batches=3"]:
        args += ["--set", o]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_LOGGING_LEVEL"}
    proc = subprocess.run(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    assert "\r" not in err and "site-packages" not in err
    lines = err.strip().splitlines()
    assert [ln for ln in lines if not TOWERLINE_LINE.match(ln)] == [], "lines from other libraries reached the user"
    epochs = [EPOCH_LINE.search(ln) for ln in lines if "towerline.training.progress" in ln]
    assert [int(m.group(1)) for m in epochs if m] == [1, 2] and len(epochs) == 2
    assert "MLflow run: " in proc.stdout


def test_data_generate_names_the_flag_it_rejects(tmp_path, capsys):
    assert main(["data", "generate", "--out", str(tmp_path), "--users", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: --users must be >= 1, got 0"]


def _every_parser(parser, path=()):
    import argparse

    yield " ".join(path) or "towerline", parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _every_parser(sub, (*path, name))


def test_every_help_has_no_markup_and_wrapped_descriptions(monkeypatch):
    from towerline.cli import build_parser

    monkeypatch.setenv("COLUMNS", "200")  # a wide terminal: descriptions still wrap at 100
    parsers = list(_every_parser(build_parser()))
    assert {"quickstart", "train", "train-ranker", "evaluate", "promote", "index", "data validate"} <= {p for p, _ in parsers}
    for path, parser in parsers:
        text = parser.format_help()
        assert "``" not in text and "%%" not in text, path
        formatter = parser._get_formatter()
        formatter.add_text(parser.description)
        described = formatter.format_help().splitlines()
        assert all(len(line) <= 100 for line in described), (path, max(described, key=len))


def test_top_level_examples_cover_every_main_command(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("quickstart", "data generate", "train", "evaluate", "promote", "train-ranker", "index", "serve"):
        assert f"\n  towerline {command} " in out, command


def test_quickstart_on_your_own_file_trains_registers_and_indexes_it(tmp_path, monkeypatch, capsys, caplog):
    from towerline.features.synthetic import generate_dataset

    monkeypatch.chdir(tmp_path)  # the MLflow store (./mlflow.db, ./mlruns) lands here
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    events = generate_dataset(300, 60, seed=0).events.rename(columns={"user_id": "customer", "item_id": "sku"})
    events.to_csv(tmp_path / "orders.csv", index=False)
    args = ["quickstart", "--data", "orders.csv", "--map", "user_id=customer,item_id=sku", "--epochs", "1",
            "--out", "qs", "--no-serve"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "[1/5] reading and validating orders.csv" in out and "dataset          orders" in out
    assert "registered towerline-retriever version 1" in out
    assert "[4/5] exact FAISS index over 60 items" in out  # the catalogue, not the 2 reserved rows
    consent = [r for r in caplog.records if "no users file" in r.getMessage()]
    assert len(consent) == 1 and consent[0].levelname == "WARNING"  # read once, warned once
