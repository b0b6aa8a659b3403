"""What ``POST /admin/reload`` may load, and the copies of registry bundles it leaves behind.

A reload names a registry URI (``models:/...``, ``runs:/...``) or a bundle folder under the
configured ``models_root`` (default: the folder holding the bundle the app started with). Any
other path gets one generic answer whatever the reason (missing, not a folder, no manifest,
outside the root), so the endpoint cannot be used to probe the server's file system; the reason
goes to the log only.

Bundles from the registry are downloaded into a ``towerline-bundle-*`` temp folder
(``towerline.bundle.resolve_bundle_uri``). ``TempCopies`` remembers the ones this process loaded
and deletes a version's folder when the version is dropped (replaced by a reload, evicted from a
stage replica's cache) and every remaining one at shutdown. Deleting is safe once the version is
loaded: ``load_bundle`` and ``load_index`` read every artifact into memory.
"""

from __future__ import annotations

import atexit
import logging
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

REGISTRY_SCHEMES = ("models:/", "runs:/")
TEMP_PREFIX = "towerline-bundle-"
BAD_SOURCE = ("model and index_dir must be a registry URI (models:/<name>@<alias>, models:/<name>/<version>, "
              "runs:/<run_id>/bundle) or a bundle folder under the server's models_root")


class BadSource(ValueError):
    """A reload named something it may not load; the message is the same for every reason."""

    def __init__(self) -> None:
        super().__init__(BAD_SOURCE)


def default_models_root(model: str) -> Optional[str]:
    """The folder holding the served bundle when it is a local directory; None for a registry URI."""
    if model.startswith(REGISTRY_SCHEMES):
        return None
    return str(Path(model).resolve().parent)


def allowed_source(value: str, root: Optional[str], *, index: bool = False) -> str:
    """``value`` as the loader should get it (registry URIs as sent, folders resolved), or ``BadSource``.

    A folder must resolve (symlinks followed) to somewhere under ``root`` and hold a bundle (its
    ``manifest.json``) or, for ``index``, an index (``index.faiss``).
    """
    if not index and value.startswith(REGISTRY_SCHEMES):
        return value
    if root is None:
        log.warning("reload refused: %a (no models_root: only registry URIs may be loaded)", value)
        raise BadSource()
    try:
        base = Path(root).resolve()
        path = Path(value).expanduser()
        path = (path if path.is_absolute() else base / path).resolve()
        inside = path == base or path.is_relative_to(base)
        marker = path / ("index.faiss" if index else "manifest.json")
        ok = inside and path.is_dir() and marker.is_file()
    except (OSError, ValueError, RuntimeError):
        ok = False
    if not ok:
        log.warning("reload refused: %a is not a %s folder under models_root %a", value, "index" if index else "bundle", root)
        raise BadSource()
    return str(path)


def temp_copy_of(bundle_path: Path | str) -> Optional[Path]:
    """The ``towerline-bundle-*`` temp folder that holds ``bundle_path`` (a registry download), or None."""
    tmp = Path(tempfile.gettempdir()).resolve()
    path = Path(bundle_path).resolve()
    for parent in (path, *path.parents):
        if parent.parent == tmp and parent.name.startswith(TEMP_PREFIX):
            return parent
    return None


class TempCopies:
    """Temp folders of the registry bundles this process loaded, deleted when dropped and at exit."""

    def __init__(self) -> None:
        self._folders: dict[Path, int] = {}  # folder -> versions using it
        self._lock = threading.Lock()
        atexit.register(self.close)

    def keep(self, bundle_path: Path | str) -> None:
        folder = temp_copy_of(bundle_path)
        if folder is not None:
            with self._lock:
                self._folders[folder] = self._folders.get(folder, 0) + 1

    def drop(self, bundle_path: Path | str) -> None:
        folder = temp_copy_of(bundle_path)
        if folder is None:
            return
        with self._lock:
            left = self._folders.get(folder, 1) - 1
            if left > 0:
                self._folders[folder] = left
                return
            self._folders.pop(folder, None)
        shutil.rmtree(folder, ignore_errors=True)
        log.info("deleted the bundle copy %s", folder)

    def close(self) -> None:
        with self._lock:
            folders, self._folders = list(self._folders), {}
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
        if folders:
            log.info("deleted %d bundle copies", len(folders))
