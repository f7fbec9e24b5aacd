"""The guard of tests/process_state.py catches a test that leaves process-wide state changed, names
what it changed, restores it for the tests after it, and lets a test that restores what it set pass.
Run as a pytest session of its own (a subprocess), so the failures it provokes stay there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

PROBE = '''
import os
import pytest
import torch
from mol.machine import torch_threads

START = torch.get_num_threads()
OTHER = 1 if START > 1 else 2


def test_a_leaked_thread_count():
    torch.set_num_threads(OTHER)


def test_sees_the_thread_count_restored():
    assert torch.get_num_threads() == START


def test_a_restored_thread_count():
    with torch_threads(OTHER):
        assert torch.get_num_threads() == OTHER


def test_a_leaked_dtype_and_grad_mode():
    torch.set_default_dtype(torch.float64)
    torch.set_grad_enabled(False)


def test_sees_dtype_and_grad_mode_restored():
    assert torch.get_default_dtype() == torch.float32 and torch.is_grad_enabled()


def test_a_leaked_environment_variable():
    os.environ["MOL_PROBE_LEAK"] = "1"


def test_a_monkeypatched_variable(monkeypatch):
    monkeypatch.setenv("MOL_PROBE_PATCHED", "1")


def test_sees_the_environment_restored():
    assert "MOL_PROBE_LEAK" not in os.environ


@pytest.fixture(scope="module")
def for_the_module():
    os.environ["MOL_PROBE_MODULE"] = "1"  # held while the module runs, given back after it
    yield
    del os.environ["MOL_PROBE_MODULE"]


def test_a_module_fixture_holds_a_setting(for_the_module):
    assert os.environ["MOL_PROBE_MODULE"] == "1"


def test_the_module_fixture_still_holds_it(for_the_module):
    assert os.environ["MOL_PROBE_MODULE"] == "1"
'''

LEAKY_MODULE = '''
import os
import pytest


@pytest.fixture(scope="module")
def leaky():
    os.environ["MOL_PROBE_MODULE_LEAK"] = "1"  # never given back
    yield


def test_uses_a_leaky_module_fixture(leaky):
    pass
'''


def test_the_guard_fails_a_test_that_leaves_state_changed_and_restores_it(tmp_path):
    (tmp_path / "test_probe.py").write_text(PROBE)
    (tmp_path / "test_probe_module.py").write_text(LEAKY_MODULE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)])}
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "process_state", "-p", "no:cacheprovider", "-rA",
                        "-q", "test_probe.py", "test_probe_module.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    errors = {ln.split("::")[1].split(" ")[0] for ln in out.splitlines() if ln.startswith("ERROR test_probe")}
    assert errors == {"test_a_leaked_thread_count", "test_a_leaked_dtype_and_grad_mode",
                      "test_a_leaked_environment_variable", "test_uses_a_leaky_module_fixture"}, out
    passed = {ln.split("::")[1] for ln in out.splitlines() if ln.startswith("PASSED test_probe.py::")}
    assert passed == {"test_a_leaked_thread_count", "test_sees_the_thread_count_restored", "test_a_restored_thread_count",
                      "test_a_leaked_dtype_and_grad_mode", "test_sees_dtype_and_grad_mode_restored",
                      "test_a_leaked_environment_variable", "test_a_monkeypatched_variable",
                      "test_sees_the_environment_restored", "test_a_module_fixture_holds_a_setting",
                      "test_the_module_fixture_still_holds_it"}, out  # a leaker passes its call, errs in teardown
    assert "test_a_leaked_thread_count (or a fixture of it) left process-wide state changed, now restored: " \
        "torch threads:" in out, out
    assert "default dtype: torch.float32 -> torch.float64; grad mode: True -> False" in out, out
    assert "test_probe_module.py (a module-scoped fixture) left process-wide state changed, now restored: " \
        "$MOL_PROBE_MODULE_LEAK: None -> '1'" in out, out
    assert "$MOL_PROBE_LEAK: None -> '1'" in out and "MOL_PROBE_PATCHED" not in out, out
