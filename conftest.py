"""Suite-wide test plumbing.

* Every Deferred-returning test and async fixture is bounded in time: a Deferred
  that never fires is cancelled after ``ASYNCFILE_TEST_TIMEOUT`` seconds (default
  60) and the test fails with ``TimeoutError`` instead of hanging the run.
  pytest-timeout (``timeout`` in pyproject.toml) is the backstop for
  synchronous code.
* ``ASYNCFILE_TEST_REACTOR=poll|select`` runs the suite on those reactors, which
  pytest-twisted's ``--reactor`` option does not offer (it has ``default`` and
  ``asyncio``).

The reactor is never imported at module level here: pytest-twisted installs it
in ``pytest_configure``.
"""

import os

import pytest
import pytest_twisted

TEST_TIMEOUT = float(os.environ.get("ASYNCFILE_TEST_TIMEOUT", "60"))

_run_inline_callbacks = pytest_twisted._run_inline_callbacks


def _bounded_run_inline_callbacks(f, *args):
    from twisted.internet import defer

    def bounded(*a):
        d = defer.maybeDeferred(f, *a)
        d.addTimeout(TEST_TIMEOUT, pytest_twisted._instances.reactor)
        return d

    return _run_inline_callbacks(bounded, *args)


pytest_twisted._run_inline_callbacks = _bounded_run_inline_callbacks


def _installer(module_name: str, class_name: str):
    def install():
        import importlib

        module = importlib.import_module(f"twisted.internet.{module_name}")
        pytest_twisted._install_reactor(
            reactor_installer=module.install,
            reactor_type=getattr(module, class_name),
        )

    return install


_EXTRA_REACTORS = {
    "poll": _installer("pollreactor", "PollReactor"),
    "select": _installer("selectreactor", "SelectReactor"),
}


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    name = os.environ.get("ASYNCFILE_TEST_REACTOR")
    if name:
        if name not in _EXTRA_REACTORS:
            raise pytest.UsageError(
                f"ASYNCFILE_TEST_REACTOR={name!r}: choose from {sorted(_EXTRA_REACTORS)}"
            )
        pytest_twisted.reactor_installers["default"] = _EXTRA_REACTORS[name]
