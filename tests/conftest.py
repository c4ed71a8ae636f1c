"""Shared fixtures: unit tests run anywhere, kernel tests need root, and a test run leaves
no namespace behind.

Every testbed made during the session uses its own namespace prefix (``AGGBOX_PREFIX``)
and state directory (``AGGBOX_STATE_DIR``), inherited by subprocesses too: the leak
check then knows exactly which namespaces are this run's, and concurrent runs or a
developer's own testbed are never touched.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import tempfile

import pytest

SESSION_PREFIX = f"abx-t{secrets.token_hex(2)}"
_STATE_DIR = tempfile.mkdtemp(prefix="aggbox-test-state-")
# (also when no test runs, e.g. a path that does not exist: the fixture below never does)
atexit.register(shutil.rmtree, _STATE_DIR, ignore_errors=True)
os.environ["AGGBOX_PREFIX"] = SESSION_PREFIX
os.environ["AGGBOX_STATE_DIR"] = _STATE_DIR


def is_root() -> bool:
    return os.geteuid() == 0


@pytest.fixture(autouse=True)
def root(request: pytest.FixtureRequest) -> None:
    """Tests marked ``kernel`` need root: skipped without it, but a failure on CI
    (CI=true), where a skip would silently pass a run that tested nothing."""
    if request.node.get_closest_marker("kernel") is None or is_root():
        return
    if os.environ.get("CI") == "true":
        pytest.fail("kernel tests need root and CI=true: run the suite as root")
    pytest.skip("kernel test: needs root")


@pytest.fixture(scope="session")
def session_prefix() -> str:
    """The namespace prefix of every testbed this test run creates."""
    return SESSION_PREFIX


@pytest.fixture(scope="session", autouse=True)
def no_namespace_left_behind():
    """Fails the session if any namespace this run created is still there (and removes
    it, so a failing run does not leave the machine dirty either)."""
    yield
    from aggbox.testbed.netns import down_all, list_namespaces

    left = list_namespaces(SESSION_PREFIX)
    if left:
        down_all(SESSION_PREFIX)
    shutil.rmtree(_STATE_DIR, ignore_errors=True)
    containers, networks = _docker_leftovers()
    assert not left, f"the test run left namespaces behind: {' '.join(left)}"
    assert not containers and not networks, (
        f"the test run left docker containers {containers} / networks {networks} behind")


def _docker_leftovers() -> tuple[list[str], list[str]]:
    """Docker testbed resources of this session (removed); none when no engine runs."""
    try:
        from aggbox.testbed.docker import down_all_docker, list_docker_resources
    except ImportError:
        return [], []
    left = list_docker_resources(SESSION_PREFIX)
    if left[0] or left[1]:
        down_all_docker(SESSION_PREFIX)
    return left


# torch is the optional aggbox[torch] extra (scripts/setup.sh: PyTorch's CPU index when it
# answers, AGGBOX_TORCH=pypi otherwise). Without it, the modules that need it are reported
# as skipped with the reason instead of failing to import; on CI (CI=true, where .ci/run
# installs torch) they are collected as usual, so a missing torch fails there.
NEEDS_TORCH = {"test_torch_hook.py", "test_torch_hook_async.py", "test_training_backends.py"}
NO_TORCH_REASON = ("torch is not installed (the optional aggbox[torch] extra: "
                   "AGGBOX_TORCH=pypi make setup, or PyTorch's CPU index when reachable)")


def _torch_missing() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("torch") is None
    except ImportError:
        return True


class _SkippedForTorch(pytest.Module):
    def collect(self):
        pytest.skip(NO_TORCH_REASON)


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makemodule(module_path, parent):
    if (module_path.name in NEEDS_TORCH and os.environ.get("CI") != "true"
            and _torch_missing()):
        return _SkippedForTorch.from_parent(parent, path=module_path)
    return None
