"""The README's first command ends with `minicpmv-edge demo`: it must work from any folder with its defaults."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_demo_runs_from_a_temporary_folder_with_defaults(tmp_path):
    exe = Path(sys.executable).with_name("minicpmv-edge")
    cmd = [str(exe), "demo"] if exe.exists() else [sys.executable, "-m", "minicpmv_edge", "demo"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    print(out[-2000:])
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out
    assert (tmp_path / "demo-out" / "bundle" / "manifest.json").is_file(), "the default ./demo-out was not written"
