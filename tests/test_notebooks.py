"""Every notebook under notebooks/ runs top to bottom, so the walkthroughs never rot.

Each notebook is executed with nbclient in a fresh "python3" kernel (the ipykernel of the running
interpreter's environment) from the notebooks/ folder, as a reader would run it. A failure names the
notebook, the cell number and the first line of the cell's source. Notebooks are stored without
outputs, so diffs show code changes only.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
TIMEOUT_S = 600
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # colour codes in kernel tracebacks


def _describe(path: Path, nb: nbformat.NotebookNode, index: int | None) -> str:
    if index is None:
        return f"{path.name}: failed before any cell ran"
    first_line = (nb.cells[index].source.strip().splitlines() or [""])[0]
    return f"{path.name} cell {index} ({first_line!r})"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes_without_error(path: Path):
    nb = nbformat.read(path, as_version=4)
    current: dict[str, int | None] = {"cell": None}

    def remember(cell, cell_index, **_):
        current["cell"] = cell_index

    client = NotebookClient(
        nb,
        timeout=TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},  # the kernel's working directory
        on_cell_execute=remember,
    )
    failure = None
    try:
        client.execute()
    except CellExecutionError as e:
        where = _describe(path, nb, current["cell"])
        failure = f"{where} raised {e.ename}: {e.evalue}\n{ANSI.sub('', str(e))}"
    except (CellTimeoutError, DeadKernelError) as e:
        failure = f"{_describe(path, nb, current['cell'])}: {type(e).__name__}: {e}"
    if failure:  # outside the except block, so the report is not chained to nbclient's traceback
        pytest.fail(failure, pytrace=False)

@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path: Path):
    nb = nbformat.read(path, as_version=4)
    with_outputs = [
        i for i, c in enumerate(nb.cells)
        if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)
    ]
    assert not with_outputs, (
        f"{path.name}: cells {with_outputs} carry outputs or execution counts; "
        "clear them before saving (Jupyter: Edit > Clear Outputs of All Cells)"
    )


def test_quickstart_notebook_exists():
    assert (NOTEBOOK_DIR / "quickstart.ipynb") in NOTEBOOKS


def test_every_stage_has_a_notebook():
    """data, training + comparing runs, serving, marketing, campaigns: each walkthrough is executed above."""
    names = {p.name for p in NOTEBOOKS}
    assert {"quickstart.ipynb", "train_and_track.ipynb", "serving.ipynb", "marketing.ipynb", "campaigns.ipynb"} <= names
