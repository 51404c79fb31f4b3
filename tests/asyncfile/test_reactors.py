"""The asyncfile suite on the other reactors, each in its own process.

pytest-twisted installs one reactor per process, so the epoll (default) run is
this process and the others are subprocesses: asyncio (``--reactor=asyncio``),
poll and select (``ASYNCFILE_TEST_REACTOR``, see the root conftest).
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.relpath(os.path.dirname(os.path.abspath(__file__)), ROOT)


@pytest.mark.skipif(bool(os.environ.get("ASYNCFILE_TEST_REACTOR") or os.environ.get("ASYNCFILE_NESTED")),
                    reason="already a reactor-matrix run")
@pytest.mark.parametrize("reactor_name", ["asyncio", "poll", "select"])
@pytest.mark.timeout(600)
def test_suite_passes_on_reactor(reactor_name):
    env = {**os.environ, "ASYNCFILE_NESTED": "1", "PYTHONPATH": ROOT}
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", HERE]
    if reactor_name == "asyncio":
        args.insert(3, "--reactor=asyncio")
    else:
        env["ASYNCFILE_TEST_REACTOR"] = reactor_name
    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    tail = "\n".join(out.stdout.splitlines()[-15:])
    assert out.returncode == 0, f"{reactor_name} reactor run failed:\n{tail}\n{out.stderr[-2000:]}"
    assert " passed" in tail
