"""Every setting Towerline has, as frozen dataclasses; YAML only at the edge.

One dataclass per component, each default visible with its unit or range, and ``__post_init__``
rejecting impossible values with a ``ConfigError`` that names the field. ``load_config`` is the one
place YAML (and ``--set a.b=value`` overrides) becomes these objects; it fails on unknown keys and
suggests the nearest valid name, because a misspelt key that silently keeps its default is the
costliest config bug there is. ``dataclasses.asdict`` of the result is what MLflow logs as params
and what the bundle's ``config.json`` holds.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from towerline.errors import ConfigError

log = logging.getLogger(__name__)


def _check(cond: bool, section: str, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config field '{section}.{name}': {msg}")


class FrozenMap(dict):
    """A dict that refuses changes (and so can be hashed): a mapping field of a frozen dataclass.

    A ``dict`` subclass rather than ``MappingProxyType`` so ``dataclasses.asdict``, YAML and JSON
    treat it as the plain mapping it is.
    """

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("config mappings are frozen; build a new config (load_config, dataclasses.replace)")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _refuse  # type: ignore[assignment]

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))

    def __reduce__(self) -> tuple:  # copy/deepcopy/pickle rebuild it from its items
        return (FrozenMap, (dict(self),))


@dataclass(frozen=True)
class DataConfig:
    name: str = "synthetic"  # dataset name, logged as the MLflow tag `dataset`
    format: Literal["synthetic", "s3rec", "csv", "parquet"] = "synthetic"
    path: str | None = None  # s3rec: <name>.txt; csv/parquet: folder with events/items/users files
    synthetic_users: int = 3000  # synthetic generator: number of users
    synthetic_items: int = 800  # synthetic generator: number of items
    seed: int = 0  # synthetic generator seed
    min_user_events: int = 3  # users with fewer events cannot give train+valid+test; they are counted, not used
    split: Literal["leave_one_out", "time"] = "leave_one_out"
    time_split_quantiles: tuple[float, float] = (0.8, 0.9)  # time split: valid starts / test starts
    # Towerline column name -> the column of your files that holds it, e.g. {user_id: customer,
    # item_id: sku, timestamp: ts} (`--map user_id=customer`); applies to every table read. Part of
    # the config so a bundle re-reads its data the same way (evaluate, profile).
    columns: FrozenMap = field(default_factory=lambda: FrozenMap())
    engine: Literal["local", "ray"] = "local"  # feature preparation: one process, or Ray Data over event shards

    def __post_init__(self) -> None:
        _check(self.format == "synthetic" or bool(self.path), "data", "path", f"format '{self.format}' needs a path")
        cols = self.columns if self.columns is not None else {}
        _check(isinstance(cols, dict), "data", "columns", "must map Towerline column names to your column names")
        bad = [f"{k!r}: {v!r}" for k, v in cols.items() if not (isinstance(k, str) and isinstance(v, str) and k and v)]
        _check(not bad, "data", "columns", f"names must be non-empty strings, got {', '.join(bad)}")
        object.__setattr__(self, "columns", FrozenMap(cols))  # frozen like the rest of the config
        _check(self.synthetic_users > 0, "data", "synthetic_users", "must be > 0")
        _check(self.synthetic_items > 1, "data", "synthetic_items", "must be > 1")
        _check(self.min_user_events >= 3, "data", "min_user_events", "must be >= 3 (train, valid, test)")
        lo, hi = self.time_split_quantiles
        _check(0 < lo < hi < 1, "data", "time_split_quantiles", "need 0 < valid < test < 1")


@dataclass(frozen=True)
class TwoTowerConfig:
    dim: int = 64  # output width of both towers (the FAISS vector size)
    max_len: int = 50  # history items the user tower attends over
    n_layers: int = 2  # Transformer blocks in the user tower
    n_heads: int = 2  # attention heads; must divide dim
    dropout: float = 0.3  # dropout in the user tower and on embeddings, [0, 1)
    use_attributes: bool = True  # item tower pools attribute embeddings beside the id embedding
    max_attributes: int = 8  # attribute tokens kept per item
    use_event_type: bool = True  # user tower adds an event-type embedding per history step
    id_dropout: float = 0.1  # training: chance an item occurrence loses its id embedding (DropoutNet), [0, 1)
    time_gaps: bool = False  # user tower reads log2-bucketed time gaps (to the previous step; pairwise ages as attention biases)
    # BSARec-style mixing (Shin et al., AAAI 2024), causal: each block adds freq_mix * (low-pass of the last
    # freq_window steps + learned rescaling of the rest) beside (1 - freq_mix) * self-attention; 0 = off
    freq_mix: float = 0.0
    freq_window: int = 4  # steps the causal low-pass filter averages over (the newest step included)
    # sampled softmax on a big catalogue: sparse gradients for the item-id table, updated by SparseAdam
    # (only the rows a step touched) beside AdamW for the rest. "auto": on above SPARSE_AUTO_MIN_ITEMS items.
    sparse_item_grads: bool | Literal["auto"] = "auto"
    # export: fit the cold-start mapper (attribute bag -> trained item vector, ridge on the warm items,
    # training/cold_items.py) into the bundle; cold items then get its vectors instead of the tower's attribute path
    cold_item_mapper: bool = True
    cold_item_l2: float = 0.1  # the mapper's ridge penalty, in average-weight warm items; > 0
    # the weight of each warm item in the fit, from its training interactions: "popularity" places cold
    # items where much-bought items with their attributes sit (best cold-item recall, and cold items
    # take more of everyone's top K); "sqrt"/"log"/"uniform" place them nearer the average item
    cold_item_weighting: Literal["uniform", "log", "sqrt", "popularity"] = "popularity"

    def __post_init__(self) -> None:
        _check(self.dim > 0, "model", "dim", "must be > 0")
        _check(self.max_len > 1, "model", "max_len", "must be > 1")
        _check(self.n_layers >= 1, "model", "n_layers", "must be >= 1")
        _check(self.n_heads >= 1 and self.dim % self.n_heads == 0, "model", "n_heads", f"must divide dim={self.dim}")
        _check(0 <= self.dropout < 1, "model", "dropout", "must be in [0, 1)")
        _check(self.max_attributes >= 1, "model", "max_attributes", "must be >= 1")
        _check(0 <= self.id_dropout < 1, "model", "id_dropout", "must be in [0, 1)")
        _check(0 <= self.freq_mix <= 1, "model", "freq_mix", "must be in [0, 1]")
        _check(self.freq_window >= 1, "model", "freq_window", "must be >= 1")
        _check(self.cold_item_l2 > 0, "model", "cold_item_l2", "must be > 0")


@dataclass(frozen=True)
class LossConfig:
    kind: Literal["full_softmax", "sampled_softmax"] = "full_softmax"
    n_negatives: int = 1024  # sampled softmax: uniform negatives shared by the batch (plus in-batch)
    temperature: float = 1.0  # logits are divided by this
    logq_correction: bool = True  # sampled softmax: subtract log sampling probability (Yi et al., 2019)
    label_smoothing: float = 0.0  # full softmax: share of each target's mass spread over the whole catalogue, [0, 1)

    def __post_init__(self) -> None:
        _check(self.n_negatives >= 1, "loss", "n_negatives", "must be >= 1")
        _check(self.temperature > 0, "loss", "temperature", "must be > 0")
        _check(0 <= self.label_smoothing < 1, "loss", "label_smoothing", "must be in [0, 1)")


@dataclass(frozen=True)
class TrainerConfig:
    max_epochs: int = 30  # upper bound; early stopping usually ends sooner
    max_time_s: float | None = None  # wall-clock budget for fitting, seconds (None = no budget)
    batch_size: int = 128  # sequences per batch
    lr: float = 1e-3  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    patience: int = 5  # epochs without a better valid/ndcg_10 before stopping
    seed: int = 42  # seeds torch, numpy and Python: same seed => same metrics on CPU
    accelerator: str = "auto"  # Lightning picks the device; nothing hard-codes CPU
    devices: str | int = "auto"
    precision: str = "32-true"
    eval_batch_size: int = 256  # users per full-ranking evaluation batch
    num_workers: int = 0  # DataLoader workers
    limit_train_batches: float | int = 1.0  # Lightning's knob, for smoke runs
    log_every_n_steps: int = 20
    workers: int = 1  # 1: one process (Lightning picks the devices); N > 1: N Ray Train workers running DDP
    warm_start: str | None = None  # parent model URI (models:/name@alias, runs:/..., bundle or run dir); None = from scratch
    # weights evaluated, checkpointed and exported: an exponential moving average of the training weights
    # with this time constant in epochs (decay per step exp(-1 / (ema_epochs * batches per epoch))); 0 = off
    ema_epochs: float = 0.0
    # leave-one-out only: the validation item joins each user's training sequence, and the fit runs exactly
    # max_epochs (choose them on a run without refit) with no validation or early stopping: the test model
    refit: bool = False

    def __post_init__(self) -> None:
        _check(self.max_epochs >= 1, "trainer", "max_epochs", "must be >= 1")
        _check(self.batch_size >= 1, "trainer", "batch_size", "must be >= 1")
        _check(self.lr > 0, "trainer", "lr", "must be > 0")
        _check(self.patience >= 1, "trainer", "patience", "must be >= 1")
        _check(self.max_time_s is None or self.max_time_s > 0, "trainer", "max_time_s", "must be > 0")
        _check(self.workers >= 1, "trainer", "workers", "must be >= 1")
        _check(self.ema_epochs >= 0, "trainer", "ema_epochs", "must be >= 0")


@dataclass(frozen=True)
class TrackingConfig:
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working dir
    experiment: str = "towerline"
    model_name: str = "towerline-retriever"  # registered model name; each run registers a version
    register: bool = True


@dataclass(frozen=True)
class IndexConfig:
    kind: Literal["flat", "hnsw", "ivf"] = "flat"  # flat = exact inner product
    hnsw_m: int = 32  # HNSW graph degree
    hnsw_ef_construction: int = 200
    hnsw_ef_search: int = 128
    hnsw_storage: Literal["flat", "sq8"] = "flat"  # sq8: graph over 8-bit codes (4x smaller, ~2x faster
    # per visited node), its best k * hnsw_refine_k_factor re-scored exactly: for catalogues in the millions
    hnsw_refine_k_factor: int = 2
    ivf_nlist: int = 0  # 0: about 4*sqrt(n_items)
    ivf_nprobe: int = 16
    ivf_pq_m: int = 0  # 0: no product quantisation (IVF-Flat)
    ivf_fast_scan: bool = False  # PQ with 4-bit codes scanned in SIMD registers (IndexIVFPQFastScan), needs ivf_pq_m
    ivf_refine_k_factor: int = 0  # 0: none; else the best k * factor are re-ranked against the float vectors

    def __post_init__(self) -> None:
        _check(self.hnsw_m >= 4, "index", "hnsw_m", "must be >= 4")
        _check(self.hnsw_ef_search >= 1, "index", "hnsw_ef_search", "must be >= 1")
        _check(self.hnsw_refine_k_factor >= 1, "index", "hnsw_refine_k_factor", "must be >= 1")
        _check(self.ivf_nprobe >= 1, "index", "ivf_nprobe", "must be >= 1")
        _check(self.ivf_refine_k_factor >= 0, "index", "ivf_refine_k_factor", "must be >= 0 (0: no re-ranking)")
        _check(not self.ivf_fast_scan or self.ivf_pq_m > 0, "index", "ivf_fast_scan", "needs index.ivf_pq_m > 0")


@dataclass(frozen=True)
class RankerConfig:
    enabled: bool = False  # train the ranker after the retriever in `towerline train`
    n_candidates: int = 100  # retriever top-N the ranker re-orders (training and serving)
    hidden: int = 64  # width of the ranker's MLP
    n_layers: int = 2  # MLP layers
    dropout: float = 0.1  # [0, 1)
    history_len: int = 50  # recent steps the candidate's target attention looks at
    use_profiles: bool = True  # feed the marketing layer's profile (RFM scores, lifecycle segment) per user
    loss: Literal["listwise", "pointwise"] = "listwise"  # softmax over the candidate list, or BCE per pair
    max_epochs: int = 10
    batch_size: int = 256  # training positions per batch (each with n_candidates candidates)
    lr: float = 1e-3
    patience: int = 3  # epochs without a better valid/pipeline_ndcg_10
    train_on: Literal["validation", "training"] = "validation"  # validation: the ranker learns from the users'
    # validation positions, which the retriever never trained on (its scores there look like at serving time),
    # keeping `holdout_share` of those users for model selection; training: recent training-prefix positions
    holdout_share: float = 0.2  # train_on=validation: share of validation users that select the epoch
    max_positions_per_user: int = 5  # train_on=training: positions sampled per user (most recent first)
    bootstrap_samples: int = 1000  # paired bootstrap resamples for the lift's 95% interval

    def __post_init__(self) -> None:
        _check(self.n_candidates >= 2, "ranker", "n_candidates", "must be >= 2")
        _check(self.hidden >= 1, "ranker", "hidden", "must be >= 1")
        _check(0 <= self.dropout < 1, "ranker", "dropout", "must be in [0, 1)")
        _check(self.max_positions_per_user >= 1, "ranker", "max_positions_per_user", "must be >= 1")
        _check(0 < self.holdout_share < 1, "ranker", "holdout_share", "must be in (0, 1)")


@dataclass(frozen=True)
class ProfileConfig:
    new_days: float = 30.0  # first event at most this many days before the reference time => "new"
    active_days: float = 30.0  # last event within this many days => active (or loyal)
    at_risk_days: float = 90.0  # last event older than active_days but within this => "at-risk"; older => "churned"
    loyal_min_frequency: int = 3  # active users with at least this many orders (or steps, without orders) => "loyal"
    tag_half_life_days: float = 30.0  # recency weight of an interaction halves every this many days
    n_tags: int = 5  # interest tags per user
    n_clusters: int = 8  # k-means clusters of user embeddings

    def __post_init__(self) -> None:
        _check(self.active_days < self.at_risk_days, "profile", "at_risk_days", "must exceed active_days")
        _check(self.n_clusters >= 1, "profile", "n_clusters", "must be >= 1")
        _check(self.tag_half_life_days > 0, "profile", "tag_half_life_days", "must be > 0")


@dataclass(frozen=True)
class ArmConfig:
    name: str = "control"
    model: str | None = None  # model URI or alias for this arm (e.g. models:/towerline-retriever@challenger); None = the served model
    rules: Literal["default", "popular"] = "default"  # default: the personalised pipeline; popular: no personalisation (the non-personalised arm)
    share: float = 0.5  # traffic share, (0, 1]; shares of an experiment sum to 1

    def __post_init__(self) -> None:
        _check(0 < self.share <= 1, "experiments.arms", "share", f"arm '{self.name}' share must be in (0, 1]")


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "default"
    arms: tuple[ArmConfig, ...] = (ArmConfig("control", share=1.0),)
    control: str = "control"  # the arm lifts are measured against
    currency: str = "EUR"  # ISO 4217 code of purchase values; the report labels money with it

    def __post_init__(self) -> None:
        total = sum(a.share for a in self.arms)
        _check(abs(total - 1.0) < 1e-6, "experiments", "arms", f"experiment '{self.name}' shares sum to {total}, not 1")
        names = [a.name for a in self.arms]
        _check(len(set(names)) == len(names), "experiments", "arms", f"experiment '{self.name}' repeats an arm name")
        _check(self.control in names, "experiments", "control", f"'{self.control}' is not an arm of '{self.name}'")


@dataclass(frozen=True)
class TowerlineConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: TwoTowerConfig = field(default_factory=TwoTowerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    ranker: RankerConfig = field(default_factory=RankerConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    experiments: tuple[ExperimentConfig, ...] = ()

    def __post_init__(self) -> None:
        _check(self.model.sparse_item_grads is not True or self.loss.kind == "sampled_softmax", "model", "sparse_item_grads",
               "true needs loss.kind: sampled_softmax (the full softmax scores every item row: a dense gradient)")
        _check(not self.trainer.refit or self.data.split == "leave_one_out", "trainer", "refit",
               "needs data.split: leave_one_out (the validation step joins training; a time split has no such step)")
        _check(self.trainer.workers == 1 or not self.trainer.refit, "trainer", "refit",
               "needs trainer.workers: 1 (the Ray Train path has no refit mode yet)")
        _check(not self.trainer.refit or self.ranker.enabled is False, "trainer", "refit",
               "cannot train the ranker (it learns from the validation steps the retriever was refit on)")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for JSON, YAML and MLflow params."""
    return _plain(dataclasses.asdict(cfg))


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"dim": 64}}`` -> ``{"model.dim": 64}``: how MLflow params are named."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, failing on unknown keys with a suggestion."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{where or cls.__name__}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"unknown config key '{path}'{hint}")
        kwargs[key] = _coerce(hints[key], value, path)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value or {}, path)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"config field '{path}': {value!r} is not one of {list(args)}{hint}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config field '{path}': {value!r} does not fit {tp}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config field '{path}': expected a list, got {value!r}")
        return tuple(_coerce(args[0], v, path) for v in value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config field '{path}': expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config field '{path}': expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config field '{path}': expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"config field '{path}': expected a string, got {value!r}")
        return str(value)
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML scalars) to a nested dict."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key.path=value, got '{item}'")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: '{p}' is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return data


def read_yaml_mapping(path: Path, what: str, keys: str) -> dict[str, Any]:
    """A YAML file whose top level is a mapping; each way it can fail is one ``ConfigError`` naming the file.

    ``what`` names the kind of file in "not found" (``config``, ``campaign``), ``keys`` what the
    mapping holds, for the message when the top level is a list or a scalar.
    """
    if not path.is_file():
        raise ConfigError(f"{what} file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of {keys}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TowerlineConfig:
    """YAML file (or the defaults when ``path`` is None) plus ``--set`` overrides -> ``TowerlineConfig``.

    A relative ``data.path`` is resolved against the YAML file's folder, so configs that point at
    ``../shared/data`` work from any working directory.
    """
    data: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        p = Path(path)
        data = read_yaml_mapping(p, "config", "sections")
        base = p.resolve().parent
    rel = (data.get("data") or {}).get("path") if isinstance(data.get("data"), dict) else None
    if isinstance(rel, str) and rel and not Path(rel).is_absolute():
        data["data"]["path"] = str((base / rel).resolve())  # --set paths stay relative to the cwd
    data = apply_overrides(data, overrides or [])
    return from_dict(TowerlineConfig, data)


def save_config(cfg: TowerlineConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
