import os

import pytest

ENGINES = ["nowait", "threads"]


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture(params=ENGINES)
def engine(request):
    from asyncfile.engines.nowait import nowait_supported

    if request.param == "nowait" and not nowait_supported():
        pytest.skip("RWF_NOWAIT is Linux-only")
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

    yield make
    for loader in made:
        loader.close()


@pytest.fixture
def loader(make_loader):
    return make_loader()


@pytest.fixture
def no_fd_leak(loader):
    """Fails the test if it leaves a descriptor open."""
    before = open_fds()
    yield
    leaked = open_fds() - before
    # A descriptor of the test's own (e.g. pytest's capture) may come and go;
    # only report ones that still point at files.
    leaked = {fd for fd in leaked if os.path.exists(f"/proc/self/fd/{fd}")}
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
    pytest_twisted.blockon(task.deferLater(reactor, 0, lambda: None))  # starts the reactor
