"""Shared fixtures: the built kraken-generate binary, repository paths, the reference package."""

import os
import subprocess
import sys
import json

import pytest

TOOLS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(TOOLS)
sys.path.insert(0, TOOLS)
sys.path.insert(0, os.path.join(TOOLS, "tests"))


def model_dir_of(name: str) -> str:
    return os.path.join(ROOT, "tests", "data", "models", name)


@pytest.fixture(scope="session")
def generate_bin() -> str:
    build = os.environ.get("KRAKEN_BUILD_DIR", os.path.join(ROOT, "build"))
    path = os.path.join(build, "core", "kraken-generate")
    if not os.path.exists(path):
        pytest.fail(f"{path} is missing: build first (scripts/build.sh) or set KRAKEN_BUILD_DIR")
    return path


def run_generate(binary: str, model_dir: str, *args: str) -> dict:
    """Runs kraken-generate --json and returns its JSON output."""
    out = subprocess.run([binary, model_dir, "--json", *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def pytest_configure(config):
    # `pytest -m soak` runs only the soak test (tools/tests/test_soak.py), `-m "not soak"` all but it;
    # the plain suite runs it too.
    config.addinivalue_line("markers", "soak: the serving soak test (about 2 minutes; runs in the normal suite)")
