"""The example notebooks run end to end, and are stored without outputs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def _read(path):
    nbformat = pytest.importorskip("nbformat", reason="nbformat is needed to read notebooks")
    return nbformat.read(path, as_version=4)


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebooks in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path):
    nb = _read(path)
    dirty = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
             and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, (f"{path.name}: code cells {dirty} have stored outputs or execution "
                       f"counts; clear them (jupyter nbconvert --clear-output --inplace)")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path):
    nbformat = pytest.importorskip("nbformat", reason="nbformat is needed to run notebooks")
    nbclient = pytest.importorskip("nbclient", reason="nbclient is needed to run notebooks")
    pytest.importorskip("ipykernel", reason="ipykernel is needed to run notebooks")
    nb = _read(path)
    # The stock "python3" kernel runs `python`, which jupyter_client replaces by
    # this interpreter; fail clearly if a kernel spec points somewhere else.
    check = (f"import sys\nexpected = {sys.prefix!r}\nassert sys.prefix == expected, "
             f"('the kernel runs ' + sys.executable + ', outside the test environment ' "
             f"+ expected)")
    nb.cells.insert(0, nbformat.v4.new_code_cell(check))
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=180, allow_errors=False,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    assert all(cell.execution_count is not None for cell in nb.cells
               if cell.cell_type == "code")
