"""A shared MLflow tracking server on PostgreSQL: what several training machines and Serve replicas use.

Starts a real ``mlflow server`` on a free 127.0.0.1 port with a fresh PostgreSQL database (created
here, dropped after) as its backend store and a shared artifact root under tmp_path, trains the tiny
config into it over HTTP, and reads the run and the registered version back, from the server and
from PostgreSQL itself. Skipped, with the reason, where no PostgreSQL answers on 127.0.0.1:5432
(``PGHOST``/``PGPORT``/``PGUSER`` override; trust or ``PGPASSWORD`` auth) or psycopg2 is missing.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

from support import REPO, free_port, tiny_overrides

PG_HOST = os.environ.get("PGHOST", "127.0.0.1")
PG_PORT = int(os.environ.get("PGPORT", "5432"))
PG_USER = os.environ.get("PGUSER", "postgres")

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]


def _postgres_or_skip():
    psycopg2 = pytest.importorskip("psycopg2", reason="psycopg2 missing: pip install -e '.[test]'")
    try:
        socket.create_connection((PG_HOST, PG_PORT), timeout=1).close()
    except OSError:
        pytest.skip(f"no PostgreSQL on {PG_HOST}:{PG_PORT}")
    return psycopg2


@pytest.fixture
def postgres_db():
    """A fresh database for one test, dropped afterwards (connections forced off first)."""
    psycopg2 = _postgres_or_skip()
    name = f"towerline_test_{uuid.uuid4().hex[:10]}"
    admin = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres")
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}", psycopg2, name
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture
def mlflow_server(postgres_db, tmp_path):
    """``mlflow server`` on 127.0.0.1:<free port> over the database; artifacts proxied to tmp_path."""
    store_uri, psycopg2, name = postgres_db
    port = free_port()
    log_file = open(tmp_path / "mlflow-server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store_uri,
         "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log_file, stderr=subprocess.STDOUT, cwd=tmp_path,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log_file.flush()
                pytest.fail(f"mlflow server did not start: {(tmp_path / 'mlflow-server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, store_uri, psycopg2, name
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log_file.close()


def test_training_run_and_registered_version_land_in_the_postgres_backed_server(mlflow_server, tmp_path, monkeypatch):
    import mlflow

    from towerline.training.bundle import load_bundle
    from towerline.config import load_config
    from towerline.training.train import train

    url, store_uri, psycopg2, name = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(REPO / "configs" / "synthetic.yaml", tiny_overrides(url) + ["trainer.max_epochs=1"])
    try:
        result = train(cfg, tmp_path / "run", progress=False)
        client = mlflow.MlflowClient(url)
        run = client.get_run(result.run_id)
        assert run.data.params["config/model/dim"] == "16" and "test/ndcg_10" in run.data.metrics
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # served by the server, not a local path
        assert [v.version for v in client.search_model_versions("name = 'tiny-retriever'")] == [result.model_version]
        served = load_bundle(f"models:/tiny-retriever/{result.model_version}", cache_dir=tmp_path / "cache")
        assert served.model_version == result.model_version
        assert any((tmp_path / "artifacts").rglob("weights.safetensors"))  # the shared artifact root holds the bundle
    finally:
        mlflow.set_tracking_uri(None)

    conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=name)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT run_uuid FROM runs")
            assert [r[0] for r in cur.fetchall()] == [result.run_id]
            cur.execute("SELECT name, version FROM model_versions")
            assert cur.fetchall() == [("tiny-retriever", int(result.model_version))]
    finally:
        conn.close()
