"""The integrations stay out of `import greend`, and without their library they say which package
to install. Runs whether or not the training libraries are installed."""

from __future__ import annotations

import os
import subprocess
import sys


def test_import_greend_does_not_import_the_integrations():
    code = ("import sys, greend; bad = [m for m in ('transformers', 'lightning', 'torch', "
            "'greend.integrations', 'greend.notebook', 'IPython') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_missing_transformers_names_the_package_to_install(tmp_path):
    # A directory first on sys.path whose `transformers` cannot be imported, as if not installed.
    (tmp_path / "transformers").mkdir()
    (tmp_path / "transformers" / "__init__.py").write_text("raise ImportError('no transformers')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", "import greend.integrations.transformers"],
                         capture_output=True, text=True, env=env)
    assert out.returncode != 0
    assert "pip install transformers" in out.stderr


def test_missing_lightning_names_the_package_to_install(tmp_path):
    for name in ("lightning", "pytorch_lightning"):  # as if neither were installed
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('no {name}')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", "import greend.integrations.lightning"],
                         capture_output=True, text=True, env=env)
    assert out.returncode != 0
    assert "pip install lightning" in out.stderr
