import os

import pytest

ENGINES = ["nowait", "threads", "io_uring"]


def open_fds() -> set[str]:
    # Without the descriptor listdir itself used (gone once it returns).
    return {fd for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}")}


@pytest.fixture(params=ENGINES)
def engine(request):
    from asyncfile.engines import nowait_supported

    if request.param == "nowait" and not nowait_supported():
        pytest.skip("RWF_NOWAIT is Linux-only")
    if request.param == "io_uring":
        from asyncfile.engines.uring import uring_unavailable_reason

        reason = uring_unavailable_reason()
        if reason is not None:
            pytest.skip(f"io_uring unusable: {reason}")
    return request.param


@pytest.fixture
def make_loader(engine):
    """Build loaders on the engine under test; their threads stop after the test."""
    from twisted.internet import reactor

    from asyncfile import FileLoader

    made = []

    def make(**kwargs):
        kwargs.setdefault("engine", engine)
        loader = FileLoader(reactor, **kwargs)
        made.append(loader)
        return loader

    make.made = made
    yield make
    import pytest_twisted
    from twisted.internet import defer

    pytest_twisted.blockon(defer.gatherResults([loader.close() for loader in made]).addTimeout(30, reactor))


@pytest.fixture
def loader(make_loader):
    return make_loader()


def engine_fds(*loaders) -> set[int]:
    """Descriptors held by loaders' engines (and the default loader's)."""
    from asyncfile import loader as loader_module

    fds: set[int] = set()
    for each in (*loaders, loader_module._default):
        owned = getattr(getattr(each, "engine", None), "owned_fds", None)
        if owned is not None:
            fds |= owned()
    return fds


@pytest.fixture
def no_fd_leak(loader, make_loader):
    """Fails the test if it leaves a descriptor open."""
    before = open_fds()
    yield
    leaked = open_fds() - before
    # A descriptor of the test's own (e.g. pytest's capture) may come and go;
    # only report ones that still point at files.
    leaked = {fd for fd in leaked if os.path.exists(f"/proc/self/fd/{fd}")}
    # The io_uring engine sets its ring up on first use: not a leak.
    leaked -= {str(fd) for fd in engine_fds(*make_loader.made)}
    assert not leaked, {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in leaked}


@pytest.fixture(scope="session", autouse=True)
def _warm_up():
    """Create process-wide things (mount table, reactor waker) before any
    descriptor counting starts."""
    from twisted.internet import reactor

    from asyncfile.mounts import shared_mount_table

    import pytest_twisted
    from twisted.internet import task

    shared_mount_table()
    # Twisted keeps a /dev/null descriptor from the first listening port on.
    from twisted.internet import tcp

    tcp._reservedFD.reserve()
    pytest_twisted.blockon(task.deferLater(reactor, 0, lambda: None))  # starts the reactor
