"""notebooks/quickstart.ipynb runs top to bottom in a real Jupyter kernel (nbclient), so it never rots."""

from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"


def text_of(cell) -> str:
    return "".join(out.get("text", "") for out in cell.outputs if out.output_type == "stream")


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # Stored executed, with its plot, so the repository page shows it; small (the plot is one PNG).
    stored = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.get("outputs") for cell in stored), "store the notebook executed (see CONTRIBUTING.md)"
    assert any("image/png" in out.get("data", {}) for cell in stored for out in cell.outputs)
    assert NOTEBOOK.stat().st_size < 300_000
    # the stored outputs name no folder of the machine that ran them (paths are relative to the notebook's)
    machine_roots = "|".join(("tmp", "home", "root", "work"))   # the usual roots of absolute paths, and C:\\
    assert not re.search(rf"(/(?:{machine_roots})/|[A-Z]:\\\\)", NOTEBOOK.read_text())
    assert "def load(" not in NOTEBOOK.read_text() and "load_tensor(" in NOTEBOOK.read_text()
    # The kernel imports this checkout, works in tmp_path, and sees no token of the developer's.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(NOTEBOOK.parent.parent),
                                                                    os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()

    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    outputs = [text_of(cell) for cell in code]
    assert outputs[1].startswith("method: linear") and "39 tensors" in outputs[1]   # the dry run's plan
    assert outputs[2].startswith("Merged 39 tensors")
    merged = re.search(r"max \|merged - \(0\.7 a \+ 0\.3 b\)\| = (\S+)", "".join(outputs))
    assert merged is not None and float(merged.group(1)) < 1e-6
    assert any(out.output_type == "display_data" and "image/png" in out.data for cell in code for out in cell.outputs)
    assert outputs[3].startswith("Validation of ") and ": PASSED (" in outputs[3]
    assert "recompute  passed" in outputs[3] and "bit-exact" in outputs[3]
    folded = re.search(r"max \|folded - \(W \+ 2 B A\)\| = (\S+)", outputs[5])
    assert folded is not None and float(folded.group(1)) < 1e-6 and "k_proj.weight equal to the base: True" in outputs[5]
    assert "README.md" in outputs[6] and "library_name: transformers" in outputs[6]
    dry_run = outputs[-1]
    assert dry_run.startswith("DRY RUN: nothing was sent, and no request was made\n")
    assert "/your-name/quickstart-merge (model, private=yes" in dry_run and "token     : MISSING" in dry_run
    assert (tmp_path / "quickstart" / "merged" / "model.safetensors").exists()
