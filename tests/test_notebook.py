"""The quick-start notebook runs top to bottom without an error."""

from pathlib import Path

import nbclient
import nbformat
import pytest
from ipykernel import kernelspec
from jupyter_client.kernelspec import KernelSpecManager

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"
KERNEL = "python3"


@pytest.fixture
def kernel_name(tmp_path, monkeypatch) -> str:
    """The python3 kernel, registered in a temporary Jupyter path if missing."""
    if KERNEL not in KernelSpecManager().find_kernel_specs():
        kernelspec.install(kernel_name=KERNEL, prefix=str(tmp_path))
        monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "share" / "jupyter"))
    return KERNEL


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_quickstart_notebook_runs(kernel_name):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name=kernel_name,
        timeout=300,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()  # Raises CellExecutionError on the first failing cell.
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    # Clean output: no warnings (e.g. tqdm's "IProgress not found" without
    # ipywidgets, which the [notebook] extra brings) and no log lines.
    assert not [o.text for o in outputs if o.get("name") == "stderr"]
    markdown = [
        o.data["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})
    ]
    assert any("| #0 vs #1 | 4 vs 8 | 8 | 100.00% (8/8)" in m for m in markdown)
    assert any("image/png" in o.get("data", {}) for o in outputs)
