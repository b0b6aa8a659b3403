"""MLflow: where runs go, how a run's bundle becomes a registered model version, and aliases.

The bundle is logged as plain artifacts (JSON, safetensors, npy) under the run's ``bundle/``. A
registered version points at an MLflow ``pyfunc`` model logged *from code*
(``serving/pyfunc_model.py``, the bundle as its ``bundle`` artifact): MLflow stores that file's
source, not a pickle, so ``mlflow.pyfunc.load_model("models:/<name>@<alias>")`` and
``mlflow models serve`` unpickle nothing and answer through the service's request path, while
``towerline.bundle.resolve_bundle_uri`` finds the bundle inside the model for everything else.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import warnings
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

from towerline.config import DataConfig, TrackingConfig
from towerline.errors import TowerlineError
from towerline import __version__

log = logging.getLogger(__name__)

# MLflow's advice for hand-written pyfunc models (type hints, input examples) does not apply to ours,
# which carries an explicit signature; it would reach every training log as a warning
warnings.filterwarnings("ignore", message=r"(?s).*Type hint used in the model")
warnings.filterwarnings("ignore", message=r"(?s).*An input example was not provided")

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
BUNDLE_ARTIFACT_PATH = "bundle"
PYFUNC_NAME = "pyfunc"  # the logged model's name (MLflow 3 LoggedModel), registered as each version's source
PYFUNC_CODE = "towerline.serving.pyfunc_model"  # the model-from-code file, found by name: training imports no serving


def tracking_uri(cfg: TrackingConfig) -> str:
    """Config first, then ``$MLFLOW_TRACKING_URI``, then ``mlflow.db`` in the working directory
    (as an absolute path, so Ray Serve replicas with another working directory find the same store)."""
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri == DEFAULT_TRACKING_URI:
        uri = f"sqlite:///{Path('mlflow.db').resolve()}"
    return uri


def use_tracking(cfg: TrackingConfig) -> str:
    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    return uri


def code_version() -> str:
    """Git commit of the source tree when there is one (tagged on every run), else the package version."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def log_dataset(
    client: mlflow.MlflowClient, run_id: str, data: DataConfig, digest: str, counts: dict[str, int] | None = None
) -> None:
    """Record the run's training data as an MLflow dataset input (the runs table's Dataset column).

    A ``MetaDataset`` (name, digest, source, the events schema) rather than ``from_pandas``: the
    events may be ten million rows that a reused data cache never loads, and the digest here is the
    cache key's (data settings + source file sizes and mtimes), so two runs on the same data show the
    same digest and an edited file shows another. ``counts`` (events, users, items) become input tags.
    """
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.types import ColSpec, Schema

    if data.path:
        from mlflow.data.sources import LocalArtifactDatasetSource

        source = LocalArtifactDatasetSource(str(Path(data.path).resolve()))
    else:
        source = CodeDatasetSource(tags={"generator": "towerline.features.synthetic", "users": str(data.synthetic_users),
                                         "items": str(data.synthetic_items), "seed": str(data.seed)})
    schema = Schema([ColSpec("string", "user_id"), ColSpec("string", "item_id"), ColSpec("long", "timestamp"),
                     ColSpec("string", "event_type"), ColSpec("double", "value")])
    dataset = MetaDataset(source=source, name=data.name, digest=digest[:10], schema=schema)
    tags = [InputTag("mlflow.data.context", "train"), InputTag("format", data.format)]
    tags += [InputTag(k, str(v)) for k, v in (counts or {}).items()]
    client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=tags)])


def version_description(run: Any, metrics: dict[str, float]) -> str:
    """A model version's description, as the registry page shows it (Markdown): data set, model,
    test NDCG@10 and HR@10, and a link to the run (an absolute one when the store is a server)."""
    name = run.info.run_name or run.info.run_id
    path = f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    uri = mlflow.get_tracking_uri()
    link = f"{uri.rstrip('/')}/{path}" if uri.startswith(("http://", "https://")) else path
    model = "two-tower retriever" + (" + ranker" if any(k.startswith("test/pipeline_") for k in metrics) else "")
    scores = ", ".join(
        f"{label} {metrics[key]:.4f}" for key, label in (("test/ndcg_10", "NDCG@10"), ("test/hr_10", "HR@10"))
        if key in metrics
    )
    return (
        f"{model} trained on **{run.data.tags.get('dataset', '?')}**; test {scores or '(no test metrics)'}. "
        f"Run: [{name}]({link}) (`runs:/{run.info.run_id}`)."
    )


def pyfunc_requirements() -> list[str]:
    """The installed versions of what the model code imports (``mlflow models serve`` with a conda or
    virtualenv env manager installs these; towerline itself must be installed, e.g. ``--env-manager local``).
    Listed explicitly because inferring them would load the model in a subprocess at every registration."""
    out = []
    for dist in ("torch", "faiss-cpu", "numpy", "pandas", "pyarrow", "safetensors", "pydantic", "mlflow"):
        try:
            out.append(f"{dist}=={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def _pyfunc_signature():  # noqa: ANN202 - mlflow types, imported lazily with mlflow.models
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "user_id")]),
        outputs=Schema([ColSpec("string", "user_id"), ColSpec("integer", "rank"), ColSpec("string", "item_id"),
                        ColSpec("float", "score"), ColSpec("string", "model_version", required=False),
                        ColSpec("boolean", "fallback")]),
        params=ParamSchema([ParamSpec("k", "long", 10)]),
    )


def log_pyfunc(run_id: str, bundle_dir: str | Path, model_name: str, model_version: str) -> "mlflow.models.model.ModelInfo":
    """Log the bundle as a pyfunc model from code in run ``run_id``; ``model_config`` records the
    registered name and version it is about to become (a bundle's manifest is written before both)."""
    spec = importlib.util.find_spec(PYFUNC_CODE)
    if spec is None or spec.origin is None:
        raise TowerlineError(f"{PYFUNC_CODE} is not installed; reinstall towerline (pip install -e .)")
    active = mlflow.active_run()
    if active is not None and active.info.run_id != run_id:
        raise TowerlineError(f"cannot log the pyfunc model into run {run_id}: run {active.info.run_id} is active")
    with mlflow.start_run(run_id=run_id) if active is None else _nullcontext(), warnings.catch_warnings():
        # MLflow's advice about type hints and input examples is for hand-written models; ours has a signature
        warnings.simplefilter("ignore", UserWarning)
        return mlflow.pyfunc.log_model(
            name=PYFUNC_NAME,
            python_model=spec.origin,
            artifacts={"bundle": str(bundle_dir)},
            model_config={"model_name": model_name, "model_version": model_version},
            signature=_pyfunc_signature(),
            pip_requirements=pyfunc_requirements(),
        )


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def register_bundle(run_id: str, model_name: str, bundle_dir: str | Path | None = None) -> str:
    """Register the run's bundle as a new version of ``model_name``; returns the version number.

    The version's source is a pyfunc model holding the bundle (``log_pyfunc``); ``bundle_dir`` is the
    local bundle (default: the run's ``bundle/`` artifact, downloaded). The version number is
    reserved by reading the newest one first; if another process registers in between, the model's
    recorded version is off by one and a warning says so. The version carries the run's test metrics
    as tags (``test/ndcg_10``, ...) and a description (``version_description``), so the registry page
    answers "how good is version 3?" without opening the run; metrics are read from the run itself,
    so every caller (train, train-ranker) gets them.
    """
    client = mlflow.MlflowClient()
    try:
        client.get_registered_model(model_name)
    except MlflowException:
        client.create_registered_model(model_name, description="Towerline two-tower retriever bundles")
    run = client.get_run(run_id)
    metrics = dict(run.data.metrics)
    tags = {k: f"{v:.6g}" for k, v in sorted(metrics.items()) if k.startswith("test/")}
    known = [int(v.version) for v in client.search_model_versions(f"name = '{model_name}'")]
    expected = str(max(known, default=0) + 1)
    with tempfile.TemporaryDirectory(prefix="towerline-register-") as tmp:
        if bundle_dir is None:
            bundle_dir = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=BUNDLE_ARTIFACT_PATH, dst_path=tmp)
        info = log_pyfunc(run_id, bundle_dir, model_name, expected)
    mv = client.create_model_version(model_name, source=info.model_uri, run_id=run_id, model_id=info.model_id,
                                     tags=tags, description=version_description(run, metrics))
    if str(mv.version) != expected:
        log.warning("%s: registered as version %s while the pyfunc model records %s (a concurrent registration)",
                    model_name, mv.version, expected)
    log.info("registered %s version %s (pyfunc model %s)", model_name, mv.version, info.model_uri)
    return str(mv.version)


def promote(model_name: str, version: str | int | None, alias: str = "champion") -> str:
    """Point ``alias`` at ``version`` (the newest version when None); returns the version."""
    client = mlflow.MlflowClient()
    try:
        versions = client.search_model_versions(f"name = '{model_name}'")
    except MlflowException as e:
        raise TowerlineError(f"model registry at {mlflow.get_tracking_uri()}: {e.message}") from None
    if not versions:
        raise TowerlineError(
            f"no registered model named '{model_name}' at {mlflow.get_tracking_uri()}; train one first "
            "(towerline train) or pass --tracking-uri"
        )
    known = sorted(int(v.version) for v in versions)
    chosen = str(known[-1] if version is None else version)
    if int(chosen) not in known:
        raise TowerlineError(f"model '{model_name}' has no version {chosen}; versions: {known}")
    client.set_registered_model_alias(model_name, alias, chosen)
    log.info("alias %s@%s -> version %s", model_name, alias, chosen)
    return chosen
