"""``towerline quickstart`` end to end, small: it needs nothing from the test extra and writes its
files under ``--out`` (only the MLflow store, ``mlflow.db`` and ``mlruns/``, in the working directory)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# httpx comes with the test extra only; None in sys.modules makes `import httpx` fail as if absent
WITHOUT_HTTPX = "import sys; sys.modules['httpx'] = None; from towerline.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.mark.serve
def test_quickstart_serves_one_recommendation_without_httpx_and_keeps_its_files_under_out(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    cmd = [sys.executable, "-c", WITHOUT_HTTPX, "quickstart", "--out", "qs", "--users", "300", "--items", "60",
           "--epochs", "1"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]
    assert "-> HTTP 200" in done.stdout and '"items": [' in done.stdout
    assert set(os.listdir(tmp_path)) <= {"qs", "mlflow.db", "mlruns"}, sorted(os.listdir(tmp_path))
    assert {"history.sqlite", "feedback.sqlite", "data", "run", "index"} <= set(os.listdir(tmp_path / "qs"))
