"""Real Lightning training on tiny synthetic data, logged to a real MLflow store."""

from __future__ import annotations

import json
import logging
import re
import shutil

import mlflow
import numpy as np
import pytest
import torch

from support import REPO, tiny_overrides
from towerline.training.bundle import load_bundle
from towerline.cli import main
from towerline.config import load_config
from towerline.errors import BundleError, ConfigError
from towerline.training.data import SequenceDataModule
from towerline.training.tracking import promote
from towerline.training.train import train

METRIC_KEYS = ["ndcg_5", "hr_5", "ndcg_10", "hr_10", "ndcg_20", "hr_20", "mrr", "coverage_10"]


def test_training_lowers_the_loss_and_beats_popularity(tiny_run):
    losses = [p["train/loss"] for p in tiny_run.curve]
    assert len(losses) == 2 and losses[1] < losses[0]
    # the synthetic data has sequential signal; a trained model must beat a popularity ranking,
    # whose HR@10 over 60 items is about 10/58 at best for a uniform target
    assert tiny_run.metrics["test/hr_10"] > 0.3


def test_run_is_tracked_in_mlflow_with_params_metrics_artifacts_and_a_version(tiny_run):
    client = mlflow.MlflowClient(tiny_run.tracking_uri)
    run = client.get_run(tiny_run.run_id)
    assert run.data.params["config/model/dim"] == "16"
    assert run.data.params["config/data/format"] == "synthetic"
    assert run.data.tags["dataset"] == "synthetic" and run.data.tags["code_version"]
    for key in METRIC_KEYS:
        assert f"test/{key}" in run.data.metrics
        assert f"test_unmasked/{key}" in run.data.metrics
    assert len(client.get_metric_history(tiny_run.run_id, "valid/ndcg_10")) == 2  # one per epoch
    assert len(client.get_metric_history(tiny_run.run_id, "train/loss")) == 2
    # masking seen items can only help a model whose history items are never the target
    assert run.data.metrics["test/ndcg_10"] >= run.data.metrics["test_unmasked/ndcg_10"] - 1e-9
    bundle_files = {f.path for f in client.list_artifacts(tiny_run.run_id, "bundle")}
    assert {"bundle/config.json", "bundle/item_embeddings.npy", "bundle/metrics.json", "bundle/vocab", "bundle/retriever"} <= bundle_files
    assert "training_curve.png" in {f.path for f in client.list_artifacts(tiny_run.run_id)}
    versions = client.search_model_versions("name = 'tiny-retriever'")
    assert [v.run_id for v in versions] == [tiny_run.run_id]
    assert tiny_run.model_version == str(versions[0].version)


def test_promote_then_load_by_alias_gives_the_trained_network(tiny_run, tmp_path):
    mlflow.set_tracking_uri(tiny_run.tracking_uri)
    try:
        assert promote("tiny-retriever", None, "champion") == tiny_run.model_version
        served = load_bundle("models:/tiny-retriever@champion", cache_dir=tmp_path)
    finally:
        mlflow.set_tracking_uri(None)
    local = load_bundle(tiny_run.bundle_dir)
    assert served.model_version == tiny_run.model_version and served.model_alias == "champion"
    history = torch.tensor([[0, 0, 5, 7, 9] + [11] * 7])
    with torch.no_grad():
        assert torch.allclose(served.net(history), local.net(history))
    np.testing.assert_array_equal(served.item_embeddings, local.item_embeddings)


def test_promote_refuses_an_unknown_version(tiny_run):
    mlflow.set_tracking_uri(tiny_run.tracking_uri)
    try:
        with pytest.raises(Exception, match="no version 99"):
            promote("tiny-retriever", 99)
    finally:
        mlflow.set_tracking_uri(None)


def test_bundle_with_a_changed_weight_file_is_refused(tiny_run, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_run.bundle_dir, copy)
    weights = copy / "retriever" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="weights.safetensors fails its checksum"):
        load_bundle(copy)


def test_evaluate_command_reproduces_the_run_test_metrics(tiny_run, capsys):
    assert main(["evaluate", "--model", str(tiny_run.bundle_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("test/ndcg_10", "test/hr_10", "test_unmasked/mrr"):
        assert report["metrics"][key] == pytest.approx(tiny_run.metrics[key], abs=1e-6)
    # beyond accuracy, beside coverage: novelty in bits (> 0 for any list), diversity a share of the list
    assert report["metrics"]["test/novelty_10"] > 0
    assert 0.1 <= report["metrics"]["test/diversity_10"] <= 1.0
    # and every training run logs them beside coverage, as the evaluation of its bundle reproduces them
    for key in ("test/novelty_10", "test/diversity_10"):
        assert key in tiny_run.metrics, key
    assert report["metrics"]["test/novelty_10"] == pytest.approx(tiny_run.metrics["test/novelty_10"], rel=1e-4)


def test_same_seed_gives_the_same_metrics(tiny_run, mlflow_store, tmp_path):
    cfg = load_config(REPO / "configs" / "synthetic.yaml", tiny_overrides(mlflow_store) + ["tracking.register=false"])
    again = train(cfg, tmp_path / "again", progress=False)
    for key in ("test/ndcg_10", "test/hr_10", "valid/best_ndcg_10", "test_unmasked/mrr"):
        assert again.metrics[key] == pytest.approx(tiny_run.metrics[key], abs=1e-6), key


def test_resume_continues_the_same_run_from_the_last_checkpoint(mlflow_store, tmp_path):
    base = tiny_overrides(mlflow_store) + ["tracking.register=false"]
    first = train(load_config(REPO / "configs" / "synthetic.yaml", base + ["trainer.max_epochs=1"]), tmp_path / "r", progress=False)
    assert (tmp_path / "r" / "checkpoints" / "last.ckpt").exists()
    second = train(
        load_config(REPO / "configs" / "synthetic.yaml", base + ["trainer.max_epochs=2"]), tmp_path / "r", resume=True, progress=False
    )
    assert second.run_id == first.run_id
    history = mlflow.MlflowClient(mlflow_store).get_metric_history(first.run_id, "valid/ndcg_10")
    assert len(history) == 2  # epoch 0 from the first call, epoch 1 from the resumed one
    assert [p["epoch"] for p in second.curve] == [0.0, 1.0]


def test_train_command_prints_run_id_and_test_metrics(mlflow_store, tmp_path, capsys):
    args = ["train", "--config", str(REPO / "configs" / "synthetic.yaml"), "--out", str(tmp_path / "cli"), "--no-progress"]
    for o in tiny_overrides() + ["trainer.max_epochs=1"]:
        args += ["--set", o]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "MLflow run: " in out and "registered: models:/tiny-retriever/1" in out
    assert "test: ndcg_5=" in out and "test_unmasked: " in out


def test_train_command_names_an_unknown_config_key(capsys):
    assert main(["train", "--set", "model.dimm=8"]) == 2
    assert "unknown config key 'model.dimm'; did you mean 'dim'?" in capsys.readouterr().err


def test_run_has_a_readable_name_and_its_summary_in_mlflow(tiny_run):
    run = mlflow.MlflowClient(tiny_run.tracking_uri).get_run(tiny_run.run_id)
    assert re.fullmatch(r"synthetic-twotower-\d{8}-\d{6}", run.info.run_name), run.info.run_name
    m = run.data.metrics
    assert m["train/epochs"] == 2 and m["train/seconds"] > 0
    assert m["best/epoch"] in (0, 1)
    # the best epoch's validation metrics are the ones its epoch logged, and its NDCG is the checkpoint's
    history = mlflow.MlflowClient(tiny_run.tracking_uri).get_metric_history(tiny_run.run_id, "valid/hr_10")
    assert m["best/valid_hr_10"] == pytest.approx(history[int(m["best/epoch"])].value)
    assert m["best/valid_ndcg_10"] == pytest.approx(tiny_run.metrics["valid/best_ndcg_10"])
    assert {"best/valid_mrr", "best/valid_coverage_10"} <= set(m)


def _synthetic(users: int, items: int, seed: int, mlflow_store: str) -> list[str]:
    return tiny_overrides(mlflow_store) + [
        f"data.synthetic_users={users}", f"data.synthetic_items={items}", f"data.seed={seed}",
        "trainer.max_epochs=1", "tracking.register=false",
    ]


def test_a_second_run_into_the_same_out_trains_on_its_own_data(mlflow_store, tmp_path, caplog):
    out = tmp_path / "shared-out"
    config = REPO / "configs" / "synthetic.yaml"
    first = train(load_config(config, _synthetic(300, 60, 0, mlflow_store)), out, progress=False)
    with caplog.at_level(logging.INFO, logger="towerline.training.data"):
        second = train(load_config(config, _synthetic(200, 40, 1, mlflow_store)), out, progress=False)
    rebuilt = [r for r in caplog.records if r.levelno == logging.WARNING and "rebuilding" in r.getMessage()]
    assert len(rebuilt) == 1 and "data.synthetic_items: 60 -> 40" in rebuilt[0].getMessage()

    # what the second config's data looks like when prepared on its own, in a folder of its own
    fresh = SequenceDataModule(load_config(config, _synthetic(200, 40, 1, mlflow_store)), tmp_path / "fresh")
    fresh.prepare_data()
    fresh.setup()
    client = mlflow.MlflowClient(mlflow_store)
    params = [client.get_run(r.run_id).data.params for r in (first, second)]
    assert params[0]["n_items"] != params[1]["n_items"] == str(fresh.stats.n_items)
    bundle = load_bundle(second.bundle_dir)
    assert len(bundle.items) == 40 and len(bundle.vocabs.users) == fresh.stats.n_users
    names = [client.get_run(r.run_id).info.run_name for r in (first, second)]
    assert names[0] != names[1]


def test_the_same_config_reuses_the_data_cache_and_another_rebuilds_it(tmp_path, caplog):
    config = REPO / "configs" / "synthetic.yaml"
    a = load_config(config, ["data.synthetic_users=200", "data.synthetic_items=30"])
    SequenceDataModule(a, tmp_path).prepare_data()
    with caplog.at_level(logging.INFO, logger="towerline.training.data"):
        again = SequenceDataModule(load_config(config, ["data.synthetic_users=200", "data.synthetic_items=30"]), tmp_path)
        again.prepare_data()
        assert any("reusing the cache" in r.getMessage() for r in caplog.records)
        other = SequenceDataModule(load_config(config, ["data.synthetic_users=200", "data.synthetic_items=30",
                                                        "model.max_attributes=3"]), tmp_path)
        other.prepare_data()
    assert any("model.max_attributes: 8 -> 3" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    other.setup()
    assert other.item_attributes.shape[1] == 3


def test_resume_refuses_a_cache_prepared_from_other_data(mlflow_store, tmp_path):
    config = REPO / "configs" / "synthetic.yaml"
    SequenceDataModule(load_config(config, _synthetic(300, 60, 0, mlflow_store)), tmp_path / "r" / "data").prepare_data()
    with pytest.raises(ConfigError, match=r"--resume: .* was prepared from other data \(data.seed: 0 -> 1"):
        train(load_config(config, _synthetic(300, 60, 1, mlflow_store)), tmp_path / "r", resume=True, progress=False)


def test_train_on_your_own_csv_with_its_own_column_names_then_evaluate_rereads_it(mlflow_store, tmp_path, capsys):
    """``towerline train --data FILE --map ...``: the mapping reaches the config, MLflow and the bundle,
    so ``evaluate`` (which reloads data from the bundle's config) reads the file the same way."""
    from towerline.features.synthetic import generate_dataset

    events = generate_dataset(300, 60, seed=0).events
    shop = tmp_path / "myshop"
    shop.mkdir()
    own = events.rename(columns={"user_id": "customer", "item_id": "sku", "timestamp": "ts"})
    own.assign(store="web")[["customer", "sku", "ts", "event_type", "store"]].to_csv(shop / "orders.csv", index=False)

    args = ["train", "--data", str(shop / "orders.csv"), "--map", "user_id=customer,item_id=sku", "--map", "timestamp=ts",
            "--out", str(tmp_path / "run"), "--no-progress"]
    for o in tiny_overrides() + ["trainer.max_epochs=1", "trainer.limit_train_batches=3"]:
        args += ["--set", o]
    assert main(args) == 0
    out = capsys.readouterr().out
    run_id = re.search(r"MLflow run: (\w+)", out).group(1)
    run = mlflow.MlflowClient(mlflow_store).get_run(run_id)
    assert run.data.params["config/data/columns/user_id"] == "customer"
    assert run.data.params["config/data/format"] == "csv" and run.data.tags["dataset"] == "orders"
    assert run.info.run_name.startswith("orders-twotower-")
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.name == "orders" and json.loads(inp.dataset.source)["uri"] == str((shop / "orders.csv").resolve())
    bundle_config = json.loads((tmp_path / "run" / "bundle" / "config.json").read_text())
    assert bundle_config["data"]["columns"] == {"user_id": "customer", "item_id": "sku", "timestamp": "ts"}

    assert main(["evaluate", "--model", str(tmp_path / "run" / "bundle"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["metrics"]["test/ndcg_10"] == pytest.approx(run.data.metrics["test/ndcg_10"], abs=1e-6)


def test_train_with_an_unknown_mapped_name_exits_2_with_one_line(tmp_path, capsys):
    path = tmp_path / "orders.csv"
    path.write_text("customer,sku,ts\nc1,s1,1\n")
    assert main(["train", "--data", str(path), "--map", "usr_id=customer"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: --map usr_id=customer: 'usr_id' is not a Towerline column") and "valid names:" in line


def test_registered_version_carries_test_metrics_as_tags_and_a_description(tiny_run):
    client = mlflow.MlflowClient(tiny_run.tracking_uri)
    mv = client.get_model_version("tiny-retriever", tiny_run.model_version)
    assert float(mv.tags["test/ndcg_10"]) == pytest.approx(tiny_run.metrics["test/ndcg_10"], rel=1e-5)
    assert float(mv.tags["test/hr_10"]) == pytest.approx(tiny_run.metrics["test/hr_10"], rel=1e-5)
    assert not any(k.startswith("test_unmasked/") for k in mv.tags)
    run = client.get_run(tiny_run.run_id)
    assert "trained on **synthetic**" in mv.description and "two-tower retriever" in mv.description
    assert f"NDCG@10 {tiny_run.metrics['test/ndcg_10']:.4f}" in mv.description
    assert f"HR@10 {tiny_run.metrics['test/hr_10']:.4f}" in mv.description
    assert f"#/experiments/{run.info.experiment_id}/runs/{tiny_run.run_id}" in mv.description


def test_run_logs_its_dataset_as_an_mlflow_input(tiny_run):
    run = mlflow.MlflowClient(tiny_run.tracking_uri).get_run(tiny_run.run_id)
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.name == "synthetic" and len(inp.dataset.digest) == 10
    assert json.loads(inp.dataset.source)["tags"]["users"] == "300"
    tags = {t.key: t.value for t in inp.tags}
    assert tags["mlflow.data.context"] == "train" and tags["users"] == "300" and tags["items"] == "60"
    assert "user_id" in inp.dataset.schema
