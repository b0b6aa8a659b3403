"""Warm start: a child run on newer data keeps the parent's rows and indices and trains the new ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from support import REPO, tiny_overrides

CHILD_DATA = ["data.synthetic_users=360", "data.synthetic_items=72", "data.seed=7"]  # newer users, newer items


def test_grow_vocab_keeps_old_ids_first_in_order():
    from towerline.features.vocab import Vocab
    from towerline.training.warm_start import grow_vocab

    old = Vocab(np.array(["b", "a", "c"], dtype=object))
    grown = grow_vocab(old, Vocab(np.array(["a", "d", "c", "e"], dtype=object)))
    assert list(grown.ids) == ["b", "a", "c", "d", "e"]
    assert [grown.encode_one(x) for x in ("b", "a", "c")] == [old.encode_one(x) for x in ("b", "a", "c")]


def test_warm_start_keeps_parent_rows_before_the_first_step_and_trains_new_rows(tiny_run, tmp_path):
    import lightning as L

    from towerline.config import load_config
    from towerline.training import warm_start
    from towerline.training.data import SequenceDataModule
    from towerline.training.system import TwoTowerSystem

    parent = warm_start.load_parent(str(tiny_run.bundle_dir.parent))  # a run directory works too
    cfg = load_config(REPO / "configs" / "synthetic.yaml", tiny_overrides() + CHILD_DATA)
    dm = SequenceDataModule(cfg, tmp_path / "data")
    dm.prepare_data()
    grown = warm_start.grow_prepared_data(dm, parent)
    again = warm_start.grow_prepared_data(dm, parent)  # idempotent: a reused cache is left alone
    assert all(np.array_equal(getattr(again, n).ids, getattr(grown, n).ids) for n in warm_start.VOCABS)
    dm.setup()
    n_old, n_new = len(parent.vocabs.items), len(grown.items)
    assert n_new > n_old and len(grown.users) > len(parent.vocabs.users)
    for name in warm_start.VOCABS:
        old_ids = getattr(parent.vocabs, name).ids
        np.testing.assert_array_equal(getattr(grown, name).ids[: len(old_ids)], old_ids)

    system = TwoTowerSystem(len(grown.items), len(grown.attributes), len(grown.event_types), cfg,
                            item_attributes=dm.item_attributes, item_counts=dm.item_counts)
    copied = warm_start.load_parent_weights(system.net, parent)
    assert "item_tower.id_emb.weight" in copied
    before = {k: v.clone() for k, v in system.net.state_dict().items()}
    for name, value in parent.net.state_dict().items():  # every parent tensor, row for row
        if not name.endswith("item_attributes"):
            np.testing.assert_array_equal(before[name][: value.shape[0]].numpy(), value.numpy(), err_msg=name)
    # the user tower, given the parent's item vectors, answers as the parent did (the child data
    # may describe the same items with other attributes, so the item table is held fixed here)
    hist = torch.tensor([[0, 0, 2, 3, 4]])
    table = parent.net.item_vectors()
    torch.testing.assert_close(system.net.eval().user_vector(hist, item_table=table),
                               parent.net.user_vector(hist, item_table=table))
    system.net.train()

    new_items = np.unique(dm.split.train.item_idx)
    new_items = new_items[new_items >= n_old]
    assert new_items.size, "the child window should mention items the parent never saw"
    L.Trainer(max_steps=5, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, accelerator="cpu").fit(system, datamodule=dm)
    after = system.net.item_tower.id_emb.weight.detach()
    moved = (after[new_items] - before["item_tower.id_emb.weight"][new_items]).abs().sum(dim=1)
    assert (moved > 0).all(), "new items' rows must train"


def test_train_with_warm_start_records_its_parent(tiny_run, tmp_path, monkeypatch):
    import mlflow

    from towerline.config import load_config
    from towerline.training.train import train

    monkeypatch.chdir(tmp_path)
    cfg = load_config(REPO / "configs" / "synthetic.yaml", tiny_overrides(tiny_run.tracking_uri) + CHILD_DATA + [
        "trainer.max_epochs=1", "tracking.register=false", f"trainer.warm_start=models:/tiny-retriever/{tiny_run.model_version}"])
    result = train(cfg, tmp_path / "child", progress=False)
    run = mlflow.MlflowClient(tiny_run.tracking_uri).get_run(result.run_id)
    assert run.data.tags["parent_model"] == f"models:/tiny-retriever/{tiny_run.model_version}"
    warm = [v for k, v in run.data.params.items() if k.endswith("warm_start")]  # the resolved config, as params
    assert warm == [f"models:/tiny-retriever/{tiny_run.model_version}"]
    from towerline.training.bundle import load_bundle

    child = load_bundle(result.bundle_dir)
    parent = load_bundle(tiny_run.bundle_dir)
    np.testing.assert_array_equal(child.vocabs.items.ids[: len(parent.vocabs.items.ids)], parent.vocabs.items.ids)
    mlflow.set_tracking_uri(None)


@pytest.mark.parametrize("bad", ["model.dim=32"])
def test_warm_start_refuses_another_network_shape(tiny_run, tmp_path, bad):
    from towerline.config import load_config
    from towerline.errors import BundleError
    from towerline.training.train import train

    cfg = load_config(REPO / "configs" / "synthetic.yaml", tiny_overrides(tiny_run.tracking_uri) + [
        bad, f"trainer.warm_start={tiny_run.bundle_dir}"])
    with pytest.raises(BundleError, match="model.dim"):
        train(cfg, tmp_path / "child", progress=False)
