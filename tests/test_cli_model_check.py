"""A wrong ``--model`` ends ``serve``, ``index``, ``evaluate``, ``profile`` and ``audience`` at once: exit 2, one line, no Ray.

In-process CLI calls, so ``ray.is_initialized()`` tells whether the command got as far as Ray.
"""

from __future__ import annotations

import shutil
import time

import pytest
import ray

from towerline.bundle import check_model
from towerline.cli import main
from towerline.errors import BundleError

COMMANDS = ["serve", "index", "evaluate", "profile", "audience"]
EXTRA = {"audience": ["--item", "i00001"], "profile": ["--no-mlflow"]}  # each command's other required flags


def _run(capsys, argv: list[str]) -> tuple[int, list[str], float]:
    t0 = time.monotonic()
    rc = main(argv)
    elapsed = time.monotonic() - t0
    return rc, capsys.readouterr().err.strip().splitlines(), elapsed


def _bad_models(tmp_path, tiny_run) -> dict[str, tuple[str, str]]:
    """name -> (--model value, text the one error line must contain)."""
    empty = tmp_path / "not-a-bundle"
    empty.mkdir()
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_run.bundle_dir, corrupt)
    (corrupt / "item_embeddings.npy").write_bytes(b"changed")
    return {
        "folder": (str(empty), "not-a-bundle is not a Towerline bundle: manifest.json is missing"),
        "run folder": (str(tiny_run.bundle_dir.parent), "did you mean"),
        "missing path": (str(tmp_path / "nowhere"), "is neither a bundle directory nor an MLflow"),
        "corrupt": (str(corrupt), "item_embeddings.npy fails its checksum"),
        "unknown run": ("runs:/0123456789abcdef/bundle", "could not download the bundle"),
        "unknown alias": ("models:/no-such-model@champion", "not in the model registry"),
    }


@pytest.mark.parametrize("command", COMMANDS)
def test_a_model_that_does_not_resolve_is_one_line_and_exit_2_before_ray(command, tiny_run, mlflow_store, tmp_path, capsys):
    import mlflow

    mlflow.MlflowClient(mlflow_store).search_experiments()  # the store exists: MLflow logs no set-up lines
    capsys.readouterr()
    assert not ray.is_initialized()
    for name, (model, expected) in _bad_models(tmp_path, tiny_run).items():
        argv = [command, "--model", model, "--tracking-uri", mlflow_store, *EXTRA.get(command, [])]
        if command in ("profile", "audience"):
            argv += ["--out", str(tmp_path / f"{command}.out")]
        rc, err, elapsed = _run(capsys, argv)
        assert rc == 2, (name, err)
        assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], (name, err)
        assert not ray.is_initialized(), name
        assert elapsed < 10, (name, elapsed)


def test_check_model_returns_the_bundle_folder_of_a_good_model(tiny_run):
    assert check_model(tiny_run.bundle_dir) == tiny_run.bundle_dir
    with pytest.raises(BundleError, match="did you mean"):
        check_model(tiny_run.bundle_dir.parent)
