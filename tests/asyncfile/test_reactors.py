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
# What depends on the reactor: loads, streams, the pool, the ring, slow
# storage, ownership, senders and zero-copy transfers. Pure system-call tests
# (confine, ring binding, mounts, the FUSE file systems themselves) and the
# model test run once, on epoll.
REACTOR_SENSITIVE = ["test_loader.py", "test_stream.py", "test_slow_storage.py", "test_uring_engine.py",
                     "test_pool.py", "test_ownership.py", "test_memory_loader.py", "test_sender.py",
                     "test_sendfile.py"]
# Tests in those modules that do not depend on the reactor (they check values,
# buffers, system calls and confinement, or run a subprocess on its own
# reactor): once, on epoll (~20 s less per reactor; the three modules take ~35 s a reactor).
REACTOR_INDEPENDENT = [
    # test_ownership
    "test_nul_in_the_path_is_a_value_error", "test_offset_two_to_the_63_fails_with_the_original_type",
    "test_a_terabyte_buffer_cannot_be_allocated_under_the_cap", "test_a_one_terabyte_sparse_file_fails_cleanly",
    "test_every_engine_has_the_same_stats_keys", "test_a_readers_result_cannot_be_changed_afterwards",
    "test_a_loads_result_has_no_writable_alias", "test_confined_loads_never_leave_the_root",
    "test_dotdot_that_stays_inside_is_refused_on_every_engine", "test_magic_links_are_refused",
    # test_uring_engine
    "test_auto_picks_io_uring_where_the_kernel_allows_it", "test_unusable_io_uring_is_a_value_error_with_the_reason",
    "test_reactor_shutdown_stops_the_engine",
    # test_sendfile
    "test_the_plain_transports_are_twisteds_socket_transports", "test_stats_totals",
]


@pytest.mark.skipif(bool(os.environ.get("ASYNCFILE_TEST_REACTOR") or os.environ.get("ASYNCFILE_NESTED")),
                    reason="already a reactor-matrix run")
@pytest.mark.parametrize("reactor_name", ["asyncio", "poll", "select"])
@pytest.mark.timeout(600)
def test_suite_passes_on_reactor(reactor_name):
    env = {**os.environ, "ASYNCFILE_NESTED": "1", "PYTHONPATH": ROOT}
    files = [os.path.join(HERE, name) for name in REACTOR_SENSITIVE if os.path.exists(os.path.join(ROOT, HERE, name))]
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files,
            "-k", f"not ({' or '.join(REACTOR_INDEPENDENT)})"]
    if reactor_name == "asyncio":
        args.insert(3, "--reactor=asyncio")
    else:
        env["ASYNCFILE_TEST_REACTOR"] = reactor_name
    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    tail = "\n".join(out.stdout.splitlines()[-15:])
    assert out.returncode == 0, f"{reactor_name} reactor run failed:\n{tail}\n{out.stderr[-2000:]}"
    assert " passed" in tail


def test_reactor_independent_names_are_tests_of_the_matrix():
    """Each name left out of the matrix is exactly one test of its modules
    (``-k`` matches substrings: a renamed or too short name must not drop others)."""
    import ast

    names = []
    for name in REACTOR_SENSITIVE:
        with open(os.path.join(ROOT, HERE, name)) as f:
            names += [node.name for node in ast.walk(ast.parse(f.read()))
                      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_")]
    for left_out in REACTOR_INDEPENDENT:
        assert [n for n in names if left_out in n] == [left_out], left_out
