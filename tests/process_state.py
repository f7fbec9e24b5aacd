"""A pytest plugin: no test leaves process-wide state changed.

torch's thread count, default dtype, grad mode, deterministic-algorithm flags, anomaly mode, float32
matmul precision, the working directory and the environment belong to the whole process. A test that
changes one and does not restore it changes every later test in the same process: a run compared
with another as identical then differs only because the tests ran in another order (two thread
counts, two reduction orders). So the state is recorded before each test and compared after its
teardown; what changed is restored, and the test fails naming it. The same guard wraps each module
and the session, for fixtures of those scopes: they may hold a setting while they live (a module's
subprocesses need PYTHONPATH) but must give it back.

Loaded by tests/conftest.py; `pytest -p process_state` loads it alone (its own test does that).
"""

from __future__ import annotations

import os

import pytest
import torch

# Set by a library when first imported or used, to one value whichever test gets there first: pytest's
# own variable (set and removed around every phase); torch's inductor records its cache folder on its
# first compile (bitsandbytes' CPU kernels); sklearn and threadpoolctl set KMP_DUPLICATE_LIB_OK, and
# lm-eval HF_XET_HIGH_PERFORMANCE, on import.
_SET_BY_LIBRARIES = {"PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR", "KMP_DUPLICATE_LIB_OK",
                     "HF_XET_HIGH_PERFORMANCE"}


def _snapshot() -> dict:
    return {
        "torch threads": torch.get_num_threads(),
        "default dtype": torch.get_default_dtype(),
        "grad mode": torch.is_grad_enabled(),
        "deterministic algorithms": (torch.are_deterministic_algorithms_enabled(),
                                     torch.is_deterministic_algorithms_warn_only_enabled()),
        "anomaly detection": torch.is_anomaly_enabled(),
        "float32 matmul precision": torch.get_float32_matmul_precision(),
        "working directory": os.getcwd(),
        "environment": {k: v for k, v in os.environ.items() if k not in _SET_BY_LIBRARIES},
    }


def _restore(state: dict) -> None:
    torch.set_num_threads(state["torch threads"])
    torch.set_default_dtype(state["default dtype"])
    torch.set_grad_enabled(state["grad mode"])
    mode, warn_only = state["deterministic algorithms"]
    torch.use_deterministic_algorithms(mode, warn_only=warn_only)
    torch.set_anomaly_enabled(state["anomaly detection"])
    torch.set_float32_matmul_precision(state["float32 matmul precision"])
    os.chdir(state["working directory"])
    for name in set(os.environ) - set(state["environment"]) - _SET_BY_LIBRARIES:
        del os.environ[name]
    os.environ.update(state["environment"])


def changes(before: dict, after: dict) -> list[str]:
    """What differs, one phrase per setting (for the environment, per variable)."""
    out = []
    for key, was in before.items():
        now = after[key]
        if key == "environment":
            out += [f"${name}: {was.get(name)!r} -> {now.get(name)!r}" for name in sorted(set(was) | set(now))
                    if was.get(name) != now.get(name)]
        elif now != was:
            out.append(f"{key}: {was!r} -> {now!r}")
    return out


def _guard(who: str):
    before = _snapshot()
    yield
    changed = changes(before, _snapshot())
    if changed:
        _restore(before)
        pytest.fail(f"{who} left process-wide state changed, now restored: {'; '.join(changed)}", pytrace=False)


# autouse fixtures are set up before the others of their scope and torn down after them, so each
# guard sees its scope's fixtures come and go
@pytest.fixture(autouse=True, scope="session")
def _process_state_of_the_session():
    yield from _guard("a session-scoped fixture")


@pytest.fixture(autouse=True, scope="module")
def _process_state_of_the_module(request):
    yield from _guard(f"{request.node.nodeid} (a module-scoped fixture)")


@pytest.fixture(autouse=True)
def _process_state_of_the_test(request):
    yield from _guard(f"{request.node.nodeid} (or a fixture of it)")
