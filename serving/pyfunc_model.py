"""The MLflow ``pyfunc`` face of a registered version: MLflow "models from code", nothing pickled.

Every registered version is logged with ``mlflow.pyfunc.log_model(python_model=<this file>,
artifacts={"bundle": <bundle dir>})`` (``training/tracking.py``). MLflow stores this file's source,
not a pickled object; loading the model executes it, and ``set_model`` below hands MLflow a
``TowerlinePyfunc``, whose ``load_context`` loads the bundle artifact with ``training/bundle.py``
(JSON + safetensors + npy) and answers with ``Recommender`` through ``serving/batch.py``: the same
request path as ``POST /recommend`` and ``towerline recommend`` (consent, rules, popular fallback).
Example::

    model = mlflow.pyfunc.load_model("models:/towerline-retriever@champion")
    model.predict(pd.DataFrame({"user_id": ["u000001", "u000002"]}), params={"k": 10})
    # -> user_id, rank, item_id, score, model_version, fallback: k rows per user

``mlflow models serve -m models:/towerline-retriever@champion --env-manager local`` answers
``POST /invocations`` with ``{"dataframe_records": [{"user_id": "u000001"}], "params": {"k": 5}}``.
There is no online history store here: a user's history is the bundle's (batch scoring, not the
live service, which adds the events posted to it).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import mlflow
import pandas as pd
from mlflow.models import set_model

log = logging.getLogger(__name__)

DEFAULT_K = 10


class TowerlinePyfunc(mlflow.pyfunc.PythonModel):
    """A Towerline bundle behind ``predict``: a DataFrame of user ids in, recommendation rows out."""

    def load_context(self, context: Any) -> None:
        """Load the bundle artifact; ``model_config`` carries the registered name/version (unknown to
        the bundle's own manifest when it was written) and optional ``ServeSettings`` values."""
        import torch

        from towerline.serving import recommender as rec
        from towerline.serving.settings import settings_from

        config = dict(context.model_config or {})
        self.settings = settings_from(config.get("settings") or {})
        torch.set_num_threads(self.settings.threads)
        state = rec.load_model(context.artifacts["bundle"], self.settings)
        name, version = config.get("model_name"), config.get("model_version")
        if name and version:
            bundle = dataclasses.replace(state.bundle, model_name=str(name), model_version=str(version))
            state = dataclasses.replace(state, bundle=bundle, key=f"models:/{name}/{version}")
        self.state = state

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Top-``params["k"]`` (default 10) items for each ``user_id`` of ``model_input`` (a DataFrame
        with a ``user_id`` column, or a list of ids)."""
        from towerline.errors import TowerlineError
        from towerline.serving.batch import recommend_all

        if isinstance(model_input, pd.DataFrame):
            if "user_id" not in model_input.columns:
                raise TowerlineError(f"predict: the input has no user_id column (columns: {list(model_input.columns)})")
            users = model_input["user_id"].astype(str).tolist()
        else:
            users = [str(u) for u in model_input]
        k = int((params or {}).get("k", DEFAULT_K))
        return recommend_all(self.state, users, k=k, settings=self.settings, progress=False)  # type: ignore[return-value]


set_model(TowerlinePyfunc())
