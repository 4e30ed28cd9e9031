"""experiments/colab_tpu.ipynb executed on CPU, shrunk (FTLAB_NOTEBOOK_SMOKE=1): its code cells
run in order in one Python process, as a kernel would (``!cmd`` lines through the shell;
IPython, which the test extras install, for ``IPython.display``)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "experiments" / "colab_tpu.ipynb"


def notebook_script(path: Path) -> str:
    """The notebook's code cells as one script (shell escapes become subprocess calls)."""
    lines = [
        "import subprocess as _sp",
    ]
    cells = json.loads(path.read_text())["cells"]
    for cell in cells:
        if cell["cell_type"] != "code":
            continue
        for line in "".join(cell["source"]).splitlines():
            stripped = line.lstrip()
            indent = line[: len(line) - len(stripped)]
            if stripped.startswith("!"):
                line = f"{indent}_sp.run({stripped[1:]!r}, shell=True, check=True)"
            elif stripped.startswith("%"):
                raise AssertionError(f"unsupported magic in the notebook: {line}")
            lines.append(line)
    return "\n".join(lines) + "\n"


def test_the_colab_notebook_runs_on_cpu(tmp_path):
    script = tmp_path / "notebook.py"
    script.write_text(notebook_script(NOTEBOOK))
    env = {
        **os.environ,
        "FTLAB_NOTEBOOK_SMOKE": "1",
        "FTLAB_NOTEBOOK_RUNS": str(tmp_path / "runs"),
        "JAX_PLATFORMS": "cpu",
    }
    done = subprocess.run(
        [sys.executable, str(script)],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "1 cpu device(s)" in done.stdout
    assert (tmp_path / "runs" / "digits_transfer" / "results.md").exists()
    assert (tmp_path / "runs" / "bert_smoke" / "summary.json").exists()
    assert (
        "REPO_URL" in NOTEBOOK.read_text() and "github.com/ftlab/ftlab" not in NOTEBOOK.read_text()
    )
