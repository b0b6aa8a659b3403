"""Every registered version is an MLflow pyfunc model from code: loading it unpickles nothing, and it
answers through the service's request path; ``models:/`` URIs still load the bundle everywhere else."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from support import free_port


@pytest.fixture(scope="module")
def tiny_state(tiny_run):
    from towerline.serving.recommender import load_model

    return load_model(tiny_run.bundle_dir)


@pytest.fixture
def registry(tiny_run):
    mlflow.set_tracking_uri(tiny_run.tracking_uri)
    yield tiny_run
    mlflow.set_tracking_uri(None)


def test_the_registered_version_is_a_pyfunc_model_from_code_holding_the_bundle(registry, tmp_path):
    client = mlflow.MlflowClient()
    mv = client.get_model_version("tiny-retriever", registry.model_version)
    assert mv.source.startswith("models:/") and mv.run_id == registry.run_id
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(tmp_path)))
    import yaml

    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    pyfunc = mlmodel["flavors"]["python_function"]
    assert pyfunc["loader_module"] == "mlflow.pyfunc.loaders.code_model"  # source code, not a pickle
    assert pyfunc["model_code_path"].endswith("pyfunc_model.py")
    assert (local / "pyfunc_model.py").read_text().count("set_model(") == 1
    assert pyfunc["config"] == {"model_name": "tiny-retriever", "model_version": registry.model_version}
    assert not [p for p in local.rglob("*") if p.suffix in (".pkl", ".pickle", ".cloudpickle")]
    assert (local / "artifacts" / "bundle" / "manifest.json").is_file()


def test_pyfunc_predict_equals_the_recommender(registry, tiny_state):
    from towerline.serving.batch import NoOnlineHistory, known_users
    from towerline.serving.recommender import Recommender
    from towerline.serving.settings import ServeSettings
    from towerline.training.tracking import promote

    promote("tiny-retriever", registry.model_version, "champion")
    model = mlflow.pyfunc.load_model("models:/tiny-retriever@champion")
    users = known_users(tiny_state)[:15] + ["never-seen-user"]
    out = model.predict(pd.DataFrame({"user_id": users}), params={"k": 6})
    assert list(out.columns) == ["user_id", "rank", "item_id", "score", "model_version", "fallback"]
    assert (out["model_version"] == registry.model_version).all()
    rec = Recommender(tiny_state, ServeSettings(), NoOnlineHistory())
    for u in users:
        rows = out[out.user_id == u].sort_values("rank")
        want = rec.recommend(u, 6)
        assert rows["item_id"].tolist() == [i for i, _ in want.items], u
        np.testing.assert_allclose(rows["score"], [s for _, s in want.items], rtol=1e-6, atol=1e-6)
        assert rows["fallback"].eq(want.fallback).all()
    assert out.loc[out.user_id == "never-seen-user", "fallback"].all()
    default_k = model.predict(pd.DataFrame({"user_id": users[:2]}))
    assert len(default_k) == 2 * 10


def test_models_uri_still_loads_the_bundle(registry, tmp_path):
    from towerline.bundle import check_model
    from towerline.training.bundle import load_bundle

    uri = f"models:/tiny-retriever/{registry.model_version}"
    assert (check_model(uri, tmp_path / "a") / "manifest.json").is_file()
    b = load_bundle(uri, cache_dir=tmp_path / "b")
    assert b.model_name == "tiny-retriever" and b.model_version == registry.model_version
    np.testing.assert_array_equal(b.item_embeddings, load_bundle(registry.bundle_dir).item_embeddings)


@pytest.mark.serve
def test_mlflow_models_serve_answers_invocations(registry, tiny_state, tmp_path):
    """``mlflow models serve --env-manager local`` on a free 127.0.0.1 port, one POST /invocations."""
    from towerline.serving.batch import known_users

    port = free_port()
    # MLflow starts its scoring server as `uvicorn` from PATH: make that this interpreter's uvicorn, so
    # the server imports the towerline under test (a worktree's venv may borrow another's scripts)
    shim = tmp_path / "bin" / "uvicorn"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m uvicorn "$@"\n')
    shim.chmod(0o755)
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry.tracking_uri,
           "PATH": os.pathsep.join([str(shim.parent), os.environ.get("PATH", "")])}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/tiny-retriever/{registry.model_version}",
           "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    user = known_users(tiny_state)[0]
    body = json.dumps({"dataframe_records": [{"user_id": user}], "params": {"k": 4}}).encode()
    answer = None
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                             headers={"content-type": "application/json"})
                opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
                with opener.open(req, timeout=30) as resp:
                    answer = json.loads(resp.read())
                break
            except urllib.error.HTTPError as e:  # the server is up and refused the request: say why
                answer = {"error": e.code, "body": e.read().decode(errors="replace")}
                break
            except OSError:
                time.sleep(1)
    finally:
        proc.terminate()
        try:
            logs = proc.communicate(timeout=20)[0].decode(errors="replace")
        except subprocess.TimeoutExpired:
            proc.kill()
            logs = proc.communicate()[0].decode(errors="replace")
    assert answer is not None and "error" not in answer, (answer, logs[-3000:])
    rows = answer["predictions"]
    assert [r["rank"] for r in rows] == [1, 2, 3, 4] and {r["user_id"] for r in rows} == {user}
    assert all(r["model_version"] == registry.model_version for r in rows)
