"""The load-balanced deployment, run for real: ``deploy/run.py`` starts memcached, two imgserver
instances and nginx on 127.0.0.1; the tests talk to nginx and to each instance directly.

* what instance A processed, instance B answers from memcached (B's own counters: a memcached
  tier hit, nothing processed);
* the headers a CDN keys and revalidates on are right through nginx and agree between instances;
* an instance stopped in the middle of a load loses no request (nginx retries it on the other);
  ``start`` brings it back, and it answers what it processed before from its own result store;
* ``status`` sees every part; a start that fails (a port taken, a part that exits) says why and
  leaves nothing running.

Skipped, with the reason, where nginx or memcached is not installed (Debian: ``apt-get install
nginx memcached``).  The deployment is started once for the module (a few seconds) and stopped
after it; every wait is bounded.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_twisted
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, protocol, task, utils
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers

REPO = Path(__file__).resolve().parent.parent
RUN = REPO / "deploy" / "run.py"
SAMPLES = REPO / "imgserver" / "samples"
#: Bound of one run.py call (start waits up to 30 s for the parts to answer).
SCRIPT_TIMEOUT = 60.0


def _binary(name: str, *fallbacks: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    return next((p for p in fallbacks if os.access(p, os.X_OK)), None)


NGINX = _binary("nginx", "/usr/sbin/nginx", "/usr/local/sbin/nginx")
MEMCACHED = _binary("memcached", "/usr/bin/memcached", "/usr/local/bin/memcached")

pytestmark = [
    pytest.mark.skipif(NGINX is None, reason="nginx is not installed (Debian: apt-get install nginx)"),
    pytest.mark.skipif(MEMCACHED is None, reason="memcached is not installed (Debian: apt-get install memcached)"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="deploy/run.py identifies processes by /proc"),
]


def get_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


# ---------------------------------------------------------------------------
# The deployment


class Deployment:
    """One running deployment: its state directory and the ports in ``deploy.json``."""

    def __init__(self, state_dir: Path, root: Path) -> None:
        self.state_dir = state_dir
        self.root = root

    @property
    def config(self) -> dict[str, Any]:
        return json.loads((self.state_dir / "deploy.json").read_text())["config"]

    def port(self, name: str) -> int:
        return int(self.config["ports"][name])

    def pid(self, name: str) -> int | None:
        procs = json.loads((self.state_dir / "deploy.json").read_text())["procs"]
        return int(procs[name]["pid"]) if name in procs else None

    def args(self, command: str, *more: str) -> list[str]:
        return [str(RUN), command, "--state-dir", str(self.state_dir), *more]

    def access_log(self) -> list[str]:
        return (self.state_dir / "nginx" / "access.log").read_text().splitlines()


def _run_sync(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=SCRIPT_TIMEOUT)


async def run_script(deployment: Deployment, command: str, *more: str) -> tuple[int, str]:
    """``run.py COMMAND`` without blocking the reactor: (exit status, stdout + stderr)."""
    d = utils.getProcessOutputAndValue(sys.executable, deployment.args(command, *more), env=os.environ,
                                       reactor=get_reactor())
    d.addTimeout(SCRIPT_TIMEOUT, get_reactor())
    out, err, code = await d
    return code, out.decode() + err.decode()


def _make_root(root: Path) -> None:
    root.mkdir()
    for name in ("photo.jpg", "logo.png", "landscape.webp"):
        shutil.copy(SAMPLES / name, root / name)
    # A larger PNG (no JPEG draft shortcut) so that each transform of the load takes a few tens of
    # milliseconds: the load is still running when the instance is stopped.
    big = Image.radial_gradient("L").resize((700, 500)).convert("RGB")
    big.putpixel((0, 0), (255, 0, 0))
    big.save(root / "big.png", compress_level=1)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    base = tmp_path_factory.mktemp("deploy")
    dep = Deployment(base / "state", base / "images")
    _make_root(dep.root)
    # --workers 1: two instances on a two-core machine; --memcached-timeout generous enough that a
    # busy CI machine does not turn the memcached hit of the test into a miss.
    started = _run_sync(dep.args("start", "--root", str(dep.root), "--port", "0",
                                 "--", "--workers", "1", "--memcached-timeout", "1"))
    try:
        assert started.returncode == 0, f"run.py start failed:\n{started.stdout}\n{started.stderr}"
        yield dep
    finally:
        stopped = _run_sync(dep.args("stop"))
        assert stopped.returncode == 0, f"run.py stop:\n{stopped.stdout}\n{stopped.stderr}"


# ---------------------------------------------------------------------------
# HTTP and memcached clients


class Reply:
    def __init__(self, code: int, headers: dict[str, list[str]], body: bytes) -> None:
        self.code, self.headers, self.body = code, headers, body

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None

    def __repr__(self) -> str:
        return f"<Reply {self.code} {self.headers} {self.body[:120]!r}>"


class _Body(protocol.Protocol):
    def __init__(self, done: defer.Deferred[bytes]) -> None:
        self.done, self.parts = done, []

    def dataReceived(self, data: bytes) -> None:
        self.parts.append(data)

    def connectionLost(self, reason: Any) -> None:
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)


class Client:
    """HTTP/1.1 to one port on 127.0.0.1, every request bounded in time."""

    def __init__(self, port: int, persistent: bool = False, timeout: float = 20.0) -> None:
        self.reactor = get_reactor()
        self.base = f"http://127.0.0.1:{port}".encode()
        self.pool = HTTPConnectionPool(self.reactor, persistent=persistent)
        self.pool.maxPersistentPerHost = 8
        self.agent = Agent(self.reactor, pool=self.pool)
        self.timeout = timeout

    async def get(self, path: str, method: str = "GET", headers: dict[str, str] | None = None) -> Reply:
        hdrs = Headers({k.encode(): [v.encode()] for k, v in (headers or {}).items()})
        d = self.agent.request(method.encode(), self.base + path.encode(), hdrs)
        d.addCallback(self._read)
        d.addTimeout(self.timeout, self.reactor)
        return await d

    @staticmethod
    def _read(response: Any) -> defer.Deferred[Reply]:
        headers = {k.decode().lower(): [v.decode("latin-1") for v in vs]
                   for k, vs in response.headers.getAllRawHeaders()}
        done: defer.Deferred[bytes] = defer.Deferred()
        response.deliverBody(_Body(done))
        return done.addCallback(lambda body: Reply(response.code, headers, body))

    async def close(self) -> None:
        await self.pool.closeCachedConnections()


async def metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """An instance's own /metrics: (sample name, sorted labels) -> value."""
    client = Client(port)
    reply = await client.get("/metrics")
    assert reply.code == 200, reply
    samples = {}
    for family in text_string_to_metric_families(reply.body.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def processed(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> float:
    """Images really processed by the instance (one observation each in the processing histogram)."""
    return sum(v for (name, _), v in samples.items() if name == "imgserver_processing_seconds_count")


def tier_hits(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], tier: str) -> float | None:
    """The instance's hits in one result tier (``imgserver_tier_hits{tier=...}``), None if not exported."""
    found = [v for (name, labels), v in samples.items()
             if name.startswith("imgserver_tier_hits") and not name.endswith("_created")
             and ("tier", tier) in labels]
    return sum(found) if found else None


def memcached_stats(port: int) -> dict[str, str]:
    """memcached's ``stats`` (a blocking call of well under a millisecond on loopback, bounded at 2 s)."""
    with socket.create_connection(("127.0.0.1", port), timeout=2.0) as s:
        s.sendall(b"stats\r\n")
        data = b""
        while not data.endswith(b"END\r\n"):
            chunk = s.recv(65536)
            assert chunk, "memcached closed the connection"
            data += chunk
    return {parts[1]: parts[2] for parts in (line.split(" ", 2) for line in data.decode().splitlines())
            if len(parts) == 3 and parts[0] == "STAT"}


async def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await task.deferLater(get_reactor(), 0.02, lambda: None)


# ---------------------------------------------------------------------------
# Tests


@pytest_twisted.ensureDeferred
async def test_status_reports_every_part(deployment: Deployment) -> None:
    code, out = await run_script(deployment, "status", "--json")
    assert code == 0, out
    report = json.loads(out)
    assert list(report["parts"]) == ["memcached", "a", "b", "nginx"]
    for name, part in report["parts"].items():
        assert part["running"] and part["healthy"], (name, part)
        assert part["address"].startswith("127.0.0.1:")
    # The instances run as the contract says: own result dir, shared memcached, same root, one process.
    argv = json.loads((deployment.state_dir / "deploy.json").read_text())["procs"]["a"]["argv"]
    assert argv[argv.index("--root") + 1] == str(deployment.root)
    assert argv[argv.index("--result-dir") + 1] == str(deployment.state_dir / "a" / "results")
    assert argv[argv.index("--memcached") + 1] == f"127.0.0.1:{deployment.port('memcached')}"
    assert argv[argv.index("--processes") + 1] == "1"


@pytest_twisted.ensureDeferred
async def test_failed_start_leaves_nothing_running(deployment: Deployment, tmp_path: Path) -> None:
    other = Deployment(tmp_path / "state", deployment.root)
    with socket.socket() as taken:  # nginx's port is taken: nothing starts
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code, out = await run_script(other, "start", "--instances", "1", "--port", str(taken.getsockname()[1]))
    assert code == 1, out
    assert "nginx's port" in out and "not available" in out and "started" not in out, out

    # An instance that cannot start (a "Python" that exits at once): what was started before it
    # (memcached) is stopped again.
    false = shutil.which("false") or "/bin/false"
    code, out = await run_script(other, "start", "--instances", "1", "--port", "0", "--python", false)
    assert code == 1, out
    assert "a exited at start" in out and "stopping what this start started: memcached, a" in out, out
    pids = [int(line.split("(pid ")[1].split(")")[0]) for line in out.splitlines() if "started (pid" in line]
    assert len(pids) == 1, out  # memcached
    assert not _running(pids[0]), f"memcached still runs after the failed start:\n{out}"
    assert json.loads((other.state_dir / "deploy.json").read_text())["procs"] == {}
    code, out = await run_script(other, "status")
    assert code == 1 and "not running" in out, out


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@pytest_twisted.ensureDeferred
async def test_second_instance_answers_from_memcached(deployment: Deployment) -> None:
    a, b = Client(deployment.port("a")), Client(deployment.port("b"))
    mc = deployment.port("memcached")
    path = "/images/photo.jpg?w=211&h=157&fit=crop"  # no other test asks for this transform
    a_before, b_before = await metrics(deployment.port("a")), await metrics(deployment.port("b"))
    sets_before = int(memcached_stats(mc)["cmd_set"])

    first = await a.get(path)
    assert first.code == 200, first
    a_after = await metrics(deployment.port("a"))
    assert processed(a_after) == processed(a_before) + 1, "instance A should have processed the image"
    # A's put to memcached is fire-and-forget: wait until it is there.
    await wait_for(lambda: int(memcached_stats(mc)["cmd_set"]) > sets_before, 5.0, "A's put to memcached")
    hits_before = int(memcached_stats(mc)["get_hits"])

    second = await b.get(path)
    assert second.code == 200, second
    assert second.body == first.body
    assert second.header("etag") == first.header("etag")
    b_after = await metrics(deployment.port("b"))
    assert processed(b_after) == processed(b_before), "instance B processed the image instead of using memcached"
    assert int(memcached_stats(mc)["get_hits"]) == hits_before + 1
    hits = tier_hits(b_after, "memcached")
    assert hits is not None, "B's /metrics has no imgserver_tier_hits{tier=\"memcached\"} counter"
    assert hits == (tier_hits(b_before, "memcached") or 0) + 1
    await a.close()
    await b.close()


@pytest_twisted.ensureDeferred
async def test_headers_for_a_cdn(deployment: Deployment) -> None:
    lb = Client(deployment.port("nginx"))
    a, b = Client(deployment.port("a")), Client(deployment.port("b"))
    path = "/images/logo.png?w=64&h=64&fit=crop"

    # The same transform through nginx (twice: round robin over both) and from each instance directly.
    replies = [await c.get(path) for c in (lb, lb, a, b)]
    for reply in replies:
        assert reply.code == 200, reply
        assert reply.header("cache-control") == "public, max-age=86400"
        assert reply.header("content-type") == "image/png"
        assert reply.header("last-modified")
        assert reply.header("vary") is None  # nothing negotiated: nothing for a CDN to key on
        assert reply.header("content-encoding") is None
    etags = {r.header("etag") for r in replies}
    assert len(etags) == 1 and None not in etags, etags
    etag = etags.pop()
    assert replies[0].header("server") == "nginx"  # no version (server_tokens off)
    upstreams = [line.split('upstream="')[1].split('"')[0] for line in deployment.access_log() if path in line]
    assert len(set(upstreams)) == 2, f"round robin should have used both instances: {upstreams}"

    # A CDN revalidates through nginx: 304 with the validators and caching headers, no body.
    for _ in range(2):
        reply = await lb.get(path, headers={"If-None-Match": etag})
        assert reply.code == 304, reply
        assert reply.header("etag") == etag
        assert reply.header("cache-control") == "public, max-age=86400"
        assert reply.body == b""
    assert (await lb.get(path, headers={"If-None-Match": 'W/"other"'})).code == 200

    # auto=format: the answer depends on Accept, and says so (also on its 304).
    auto = "/images/photo.jpg?w=120&auto=format"
    webp = await lb.get(auto, headers={"Accept": "image/webp,*/*"})
    jpeg = await lb.get(auto, headers={"Accept": "image/jpeg"})
    assert (webp.code, webp.header("content-type"), webp.header("vary")) == (200, "image/webp", "Accept")
    assert (jpeg.code, jpeg.header("content-type"), jpeg.header("vary")) == (200, "image/jpeg", "Accept")
    assert webp.header("etag") != jpeg.header("etag")
    for c in (a, b):
        direct = await c.get(auto, headers={"Accept": "image/webp,*/*"})
        assert direct.header("etag") == webp.header("etag")
    again = await lb.get(auto, headers={"Accept": "image/webp,*/*", "If-None-Match": webp.header("etag")})
    assert (again.code, again.header("vary")) == (304, "Accept"), again

    # The original: a strong ETag equal on both instances, ranges pass through nginx.
    originals = [await c.get("/images/photo.jpg", method="HEAD") for c in (a, b)]
    assert originals[0].header("etag") == originals[1].header("etag")
    assert not originals[0].header("etag").startswith("W/")
    part = await lb.get("/images/photo.jpg", headers={"Range": "bytes=0-99"})
    assert (part.code, len(part.body)) == (206, 100), part
    assert part.body == (deployment.root / "photo.jpg").read_bytes()[:100]

    # Errors are never cached by a CDN; neither is nginx's own answer for /metrics.
    for missing in ("/images/nope.jpg?w=10", "/metrics"):
        reply = await lb.get(missing)
        assert reply.code == 404, reply
        assert reply.header("cache-control") == "no-store", reply
    for c in (lb, a, b):
        await c.close()


@pytest_twisted.ensureDeferred
async def test_stopping_an_instance_under_load_loses_no_request(deployment: Deployment) -> None:
    lb = Client(deployment.port("nginx"), persistent=True)
    total, concurrency, stop_after = 200, 8, 20
    a_port = deployment.port("a")
    a_pid = deployment.pid("a")
    answers: list[tuple[int, Reply]] = []
    stopping: list[defer.Deferred[tuple[int, str]]] = []
    queue = iter(range(total))

    def stop_a() -> defer.Deferred[tuple[int, str]]:
        return defer.Deferred.fromCoroutine(run_script(deployment, "stop", "--only", "a"))

    async def worker() -> None:
        for i in queue:
            # Distinct transforms: each is processed (nothing answered from a cache).
            reply = await lb.get(f"/images/big.png?w={100 + i}&fm=jpeg&q=80")
            answers.append((i, reply))
            if len(answers) == stop_after:
                stopping.append(stop_a())

    started = time.monotonic()
    await defer.gatherResults([defer.Deferred.fromCoroutine(worker()) for _ in range(concurrency)],
                              consumeErrors=True)
    load_time = time.monotonic() - started
    assert stopping, "the load ended before the instance was stopped"
    code, out = await stopping[0]
    assert code == 0, f"run.py stop --only a:\n{out}"  # a drained and exited within its grace

    # No request lost: every one of them answered 200 with the image asked for.
    assert len(answers) == total
    bad = [(i, r) for i, r in answers if r.code != 200]
    assert not bad, bad[:5]
    for i, reply in answers:
        with Image.open(io.BytesIO(reply.body)) as im:
            assert (im.format, im.width) == ("JPEG", 100 + i)
    assert deployment.pid("a") is None
    # nginx sent work to a before the stop and retried on b what a could no longer take.
    load = [line for line in deployment.access_log() if "/images/big.png" in line]
    assert len(load) == total
    a_addr = f"127.0.0.1:{a_port}"
    assert any(f'upstream="{a_addr}"' in line for line in load), "a never answered"
    retried = [line for line in load if f'upstream="{a_addr}, ' in line]
    # A retry also shows that the stop came in the middle of the load: requests still came after it.
    assert retried, f"no request was retried on b: did the load ({load_time:.1f} s) end before a stopped?"

    # Bring a back (start starts what is not running): the whole deployment answers again.
    code, out = await run_script(deployment, "start")
    assert code == 0, out
    assert deployment.pid("a") not in (None, a_pid)
    code, out = await run_script(deployment, "status", "--json")
    assert code == 0, out
    assert json.loads(out)["ok"]
    await lb.close()

    # The restarted a answers what it processed before the stop from its own result store.
    before_stop = [line.split('"GET ')[1].split(" ")[0] for line in load if f'upstream="{a_addr}"' in line]
    a_client = Client(a_port)
    a_before = await metrics(a_port)
    again = await a_client.get(before_stop[0])
    assert again.code == 200, again
    a_after = await metrics(a_port)
    assert processed(a_after) == processed(a_before)
    assert tier_hits(a_after, "store") == (tier_hits(a_before, "store") or 0) + 1
    await a_client.close()


def test_start_waits_for_a_part_already_running_to_answer(tmp_path: Path, monkeypatch: Any, capsys: Any) -> None:
    """A part recorded as running (same pid and start time) that does not answer -- still starting after an
    interrupted start, or hung -- is waited for like a part just started: ``start`` does not report a
    deployment ready that is not, and does not stop what it did not start."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("deploy_run_under_test", RUN)
    assert spec is not None and spec.loader is not None
    run = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, run)  # its dataclasses look their module up
    spec.loader.exec_module(run)
    monkeypatch.setattr(run, "START_TIMEOUT", 0.5)
    ports = run._free_ports(4)
    silent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        state = tmp_path / "state"
        state.mkdir()
        config = {"root": None, "instances": ["a", "b"],
                  "ports": {"nginx": ports[0], "memcached": ports[1], "a": ports[2], "b": ports[3]},
                  "python": sys.executable, "nginx_bin": NGINX, "memcached_bin": MEMCACHED, "memcached_mb": 64,
                  "nginx_workers": 1, "processes_option": True, "imgserver_args": []}
        memcached = {"pid": silent.pid, "start_time": run._proc_start_time(silent.pid), "argv": ["memcached"],
                     "log": str(tmp_path / "memcached.log")}
        (state / "deploy.json").write_text(json.dumps({"config": config, "procs": {"memcached": memcached}}))
        assert run.main(["start", "--state-dir", str(state)]) == 1
        err = capsys.readouterr().err
        assert "memcached did not answer" in err, err
        assert silent.poll() is None  # not this start's to stop
        assert set(json.loads((state / "deploy.json").read_text())["procs"]) == {"memcached"}
    finally:
        silent.kill()
        silent.wait(10)
