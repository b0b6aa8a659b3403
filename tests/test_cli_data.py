"""``towerline data generate | validate | describe`` end to end, in process and as the console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from towerline.cli import main

from support import SHARED_DATA  # noqa: E402  (../shared beside the checkout)


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "synthetic"
    assert main(["data", "generate", "--out", str(out), "--users", "80", "--items", "30", "--seed", "1", "--no-progress"]) == 0
    return out


def test_generate_writes_parquet_files_and_prints_them(generated, tmp_path, capsys):
    assert sorted(p.name for p in generated.iterdir()) == ["events.parquet", "items.parquet", "users.parquet"]
    out = tmp_path / "csv"
    assert main(["data", "generate", "--out", str(out), "--users", "20", "--items", "10", "--format", "csv", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out / 'events.csv'}" in printed and "(20 users)" in printed and "(10 items)" in printed


def test_validate_valid_folder_exits_0_with_counts(generated, capsys):
    assert main(["data", "validate", str(generated), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "80 users, 30 items" in printed and "valid (0 warning(s))" in printed


def test_validate_broken_file_exits_2_with_one_error_line_per_problem(tmp_path, capsys):
    bad = tmp_path / "events.csv"
    bad.write_text("user_id,item_id,timestamp\nu1,i1,1735689600\nu1,i2,yesterday\nu2,,5\n")
    assert main(["data", "validate", str(bad), "--no-progress"]) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2
    assert "error: events.csv row 3, field 'item_id': '' is an empty item_id; every row needs one" in errors
    assert any("events.csv row 2, field 'timestamp': 'yesterday' is neither epoch seconds nor ISO-8601" in e for e in errors)
    assert "Traceback" not in captured.err
    assert "3 events" in captured.out


def test_validate_s3rec_file_with_a_token_that_is_not_an_integer_exits_2_naming_it(tmp_path, capsys):
    bad = tmp_path / "Broken.txt"
    bad.write_text("1 5 6\n17 362 205 abc\n")
    assert main(["data", "validate", str(bad), "--format", "s3rec", "--no-progress"]) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert errors == ["error: Broken.txt line 2, field 'item_id': 'abc' is not an integer id; S3Rec lines are whole "
                      "numbers, 'user item item ...'"]
    assert "Traceback" not in captured.err


def test_validate_missing_path_exits_2(tmp_path, capsys):
    assert main(["data", "validate", str(tmp_path / "missing"), "--no-progress"]) == 2
    assert "missing file or folder" in capsys.readouterr().err


def test_describe_prints_summary_and_json(generated, capsys):
    assert main(["data", "describe", str(generated), "--no-progress"]) == 0
    text = capsys.readouterr().out
    for label in ("users", "items", "events", "sparsity", "sequence length", "event types", "time span"):
        assert label in text
    assert main(["data", "describe", str(generated), "--json", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["users"] == 80 and summary["items"] == 30
    assert set(summary["sequence_length"]) >= {"p5", "p25", "p50", "p75", "p95", "max"}
    assert abs(sum(summary["event_types"].values()) - 1.0) < 1e-6
    assert summary["sparsity"] == pytest.approx(1 - summary["events"] / (80 * 30), abs=1e-6)


def test_describe_s3rec_file(capsys):
    path = SHARED_DATA / "LastFM.txt"
    if not path.is_file():
        pytest.skip(f"shared data set {path} is absent")
    assert main(["data", "describe", str(path), "--format", "s3rec", "--json", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["users"], summary["items"], summary["events"]) == (1090, 3646, 52551)
    assert summary["event_types"] == {"interaction": 1.0}


@pytest.mark.parametrize("action", ["generate", "validate", "describe"])
def test_every_data_command_help_has_an_example(action, capsys):
    with pytest.raises(SystemExit) as e:
        main(["data", action, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "example:" in text and f"towerline data {action} " in text


def test_data_without_action_prints_help_and_exits_2(capsys):
    assert main(["data"]) == 2
    assert "generate" in capsys.readouterr().out


def _console_script() -> str:
    beside = Path(sys.executable).parent / "towerline"
    found = str(beside) if beside.exists() else shutil.which("towerline")
    if not found:
        pytest.skip("the towerline console script is not installed (pip install -e .)")
    return found


def test_console_script_validates_and_reports_exit_codes(generated, tmp_path):
    script = _console_script()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ok = subprocess.run([script, "data", "validate", str(generated)], capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "valid" in ok.stdout
    (tmp_path / "events.csv").write_text("user_id,item_id,timestamp\nu1,i1,-5\n")
    bad = subprocess.run([script, "data", "validate", str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2
    assert "error: events.csv row 1, field 'timestamp': -5 is negative" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_validate_and_describe_read_your_column_names_with_map(tmp_path, capsys):
    path = tmp_path / "orders.csv"
    path.write_text("customer,sku,ts,channel_name\nc1,s1,1735689600,web\nc1,s2,1735689700,app\nc2,s1,1735689800,web\n")
    assert main(["data", "validate", str(path), "--map", "user_id=customer,item_id=sku", "--map", "timestamp=ts"]) == 0
    out = capsys.readouterr().out
    assert "3 events, 2 users, 2 items" in out and "valid (" in out
    assert main(["data", "describe", str(path), "--map", "user_id=customer,item_id=sku,timestamp=ts", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["events"] == 3
    assert main(["data", "validate", str(path)]) == 2
    assert "--map user_id=COLUMN" in capsys.readouterr().err


def test_quickstart_names_the_flag_it_rejects(capsys):
    assert main(["quickstart", "--users", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: --users must be >= 1, got 0"]
