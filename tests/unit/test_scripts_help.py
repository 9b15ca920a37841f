"""Every script answers --help with its usage, without side effects or a running service."""

import subprocess
import sys

import pytest

from conftest import REPO

SCRIPTS = sorted(p.name for p in (REPO / "scripts").glob("*.py") if not p.name.startswith("_")
                 and "__main__" in p.read_text())


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    out = subprocess.run([sys.executable, str(REPO / "scripts" / script), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage:"), out.stdout[:200]
