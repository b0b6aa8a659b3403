"""Two Ray Train workers (DDP on one machine, gloo on CPU) train the tiny config into one MLflow run.

Real Ray, real Lightning, a real SQLite MLflow store under tmp_path: the same checks as the
one-process run in test_train.py, plus resume through Ray Train's checkpoint.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch

from towerline.training.bundle import load_bundle
from towerline.config import load_config
from towerline.features.ray_data import ray_session
from towerline.training.train import train

from support import REPO, tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture
def ray_cluster():
    """One local Ray for both fits (train_distributed joins a running Ray): one start, not two."""
    with ray_session(num_cpus=2):
        yield


def test_two_workers_log_one_run_register_a_loadable_bundle_and_resume(ray_cluster, mlflow_store, tmp_path):
    base = tiny_overrides(mlflow_store) + ["trainer.workers=2"]
    cfg = load_config(REPO / "configs" / "synthetic.yaml", base + ["trainer.max_epochs=1"])
    first = train(cfg, tmp_path / "run", progress=False)

    client = mlflow.MlflowClient(mlflow_store)
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert [r.info.run_id for r in runs] == [first.run_id]  # rank 0 logs; no run per worker
    run = runs[0]
    assert run.data.params["config/trainer/workers"] == "2" and run.data.tags["workers"] == "2"
    assert len(client.get_metric_history(first.run_id, "valid/ndcg_10")) == 1
    assert "test/ndcg_10" in run.data.metrics and run.data.metrics["train/workers"] == 2.0
    versions = client.search_model_versions("name = 'tiny-retriever'")
    assert [v.run_id for v in versions] == [first.run_id]

    served = load_bundle(f"models:/tiny-retriever/{first.model_version}", cache_dir=tmp_path / "cache")
    local = load_bundle(first.bundle_dir)
    history = torch.tensor([[0, 0, 5, 7, 9] + [11] * 7])
    with torch.no_grad():
        vec = served.net(history)
        assert torch.allclose(vec, local.net(history)) and torch.isfinite(vec).all()
    np.testing.assert_array_equal(served.item_embeddings, local.item_embeddings)
    assert first.metrics["test/ndcg_10"] > 0.1  # learnt something (popularity alone is far lower on 60 items)

    # --resume continues the same run from Ray Train's latest checkpoint
    resumed = train(load_config(REPO / "configs" / "synthetic.yaml", base + ["trainer.max_epochs=2", "tracking.register=false"]),
                    tmp_path / "run", resume=True, progress=False)
    assert resumed.run_id == first.run_id
    assert [p["epoch"] for p in resumed.curve] == [0.0, 1.0]
    assert len(client.get_metric_history(first.run_id, "valid/ndcg_10")) == 2
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


def test_workers_split_the_global_batch_so_an_epoch_takes_the_steps_of_one_process():
    from towerline.training.distributed import worker_batch_size

    assert [worker_batch_size(128, n) for n in (1, 2, 4)] == [128, 64, 32]
    assert worker_batch_size(129, 2) * 2 >= 129 and worker_batch_size(3, 8) == 1  # never a zero batch
