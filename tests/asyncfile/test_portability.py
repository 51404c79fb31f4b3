"""asyncfile where Linux's extras are missing, and across fork().

Each case runs in a subprocess: one removes ``os.preadv``, ``os.RWF_NOWAIT``
and ``os.eventfd`` before importing asyncfile (as on macOS or Windows); the
other forks a process whose loader has been used.
"""

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.timeout(120)


def run(program: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(program), *args], capture_output=True,
                          text=True, timeout=90, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})


def test_threads_engine_works_without_preadv_nowait_and_eventfd(tmp_path):
    sizes = [0, 1, 4095, 300_000, 3_000_000]
    for size in sizes:
        (tmp_path / f"f{size}").write_bytes(os.urandom(size))
    out = run("""
        import os, sys
        for name in ("preadv", "pwritev", "RWF_NOWAIT", "eventfd"):
            if hasattr(os, name):
                delattr(os, name)
        import asyncfile
        from asyncfile.engines import nowait_supported, uring_unavailable_reason
        from twisted.internet import defer, task

        class Sink:
            def __init__(self):
                self.chunks = []
            def registerProducer(self, producer, streaming):
                pass
            def unregisterProducer(self):
                pass
            def write(self, data):
                self.chunks.append(data)

        async def main(reactor):
            assert not nowait_supported() and uring_unavailable_reason() is not None
            loader = asyncfile.FileLoader(reactor, chunk_size=65536)   # auto
            assert loader.stats()["engine"] == "threads", loader.stats()["engine"]
            for size in map(int, sys.argv[2:]):
                path = os.path.join(sys.argv[1], f"f{size}")
                with open(path, "rb") as f:
                    want = f.read()
                assert await loader.load(path) == want, size
                assert await loader.load(path, 7, 100_000) == want[7:100_007], size
                sink = Sink()
                assert await loader.stream(path, sink) == size
                assert b"".join(sink.chunks) == want
            await loader.close()
            print("OK", loader.stats()["pool_reads"])

        task.react(lambda r: defer.ensureDeferred(main(r)))
    """, str(tmp_path), *map(str, sizes))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("OK "), out.stdout + out.stderr
    assert int(out.stdout.split()[1]) > 0


@pytest.mark.parametrize("engine", ["nowait", "threads", "io_uring"])
def test_after_fork_the_child_refuses_at_once_and_the_parent_keeps_working(tmp_path, engine):
    from asyncfile.engines import uring_unavailable_reason

    if engine == "io_uring" and uring_unavailable_reason() is not None:
        pytest.skip(uring_unavailable_reason())
    big = tmp_path / "big"
    big.write_bytes(os.urandom(2_000_000))
    out = run("""
        import os, sys, time
        from twisted.internet import defer
        from twisted.internet.selectreactor import SelectReactor
        from twisted.python.failure import Failure
        from asyncfile import FileLoader, ForkedError

        engine, path = sys.argv[1], sys.argv[2]
        want = open(path, "rb").read()

        def wait(reactor, d, seconds=20):
            deadline = time.monotonic() + seconds
            while not d.called and time.monotonic() < deadline:
                reactor.iterate(0.01)
            assert d.called, "never fired"
            box = []
            d.addBoth(box.append)
            return box[0]

        reactor = SelectReactor()
        loader = FileLoader(reactor, engine=engine, chunk_size=65536)
        # Used before the fork, with its threads or ring set up.
        assert wait(reactor, loader.load(path)) == want
        pool_loader = FileLoader(reactor, engine=engine, chunk_size=65536)
        handle = wait(reactor, loader.open(path))
        pid = os.fork()
        if pid == 0:
            try:
                for d in (loader.load(path), loader.open(path), loader.stream(path, object())):
                    assert d.called, "the child's old loader must refuse at once"
                    got = []
                    d.addErrback(got.append)
                    assert got and got[0].check(ForkedError), got
                child_reactor = SelectReactor()
                fresh = FileLoader(child_reactor, engine=engine, chunk_size=65536)
                assert wait(child_reactor, fresh.load(path)) == want
                wait(child_reactor, fresh.close())
                os._exit(0)
            except BaseException as e:
                print("child:", repr(e), flush=True)
                os._exit(1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "child failed"
        assert wait(reactor, loader.load(handle)) == want
        wait(reactor, handle.close())
        assert wait(reactor, loader.load(path, 5, 10)) == want[5:15]
        wait(reactor, loader.close())
        assert loader.stats()["open"] == 0
        print("OK")
    """, engine, str(big))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().endswith("OK"), out.stdout + out.stderr
