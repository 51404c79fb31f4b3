#!/usr/bin/env python3
"""Run a load-balanced imgserver on one machine: nginx in front of two instances sharing one memcached.

    python3 deploy/run.py start  [--state-dir D] [--root R] [--port P] [--instances N] [-- IMGSERVER_ARGS...]
    python3 deploy/run.py status [--state-dir D] [--json]
    python3 deploy/run.py stop   [--state-dir D] [--only NAME ...]

Everything listens on 127.0.0.1.  Each instance (``a``, ``b``, ...) is ``python -m imgserver --processes 1``
with its own ``--result-dir`` (``STATE/<name>/results``), the same ``--root`` and the shared ``--memcached``;
arguments after ``--`` go to every instance.  nginx (``deploy/nginx.conf.template``) balances over them and
retries a GET/HEAD on the next instance when one is gone or answers 502/503.

``start`` starts whatever is not running yet and waits until each part answers (memcached ``version``,
``/healthz`` of each instance and through nginx), a part already running included (it may still be
starting, or hung: it is left running, but the start fails); a port already taken stops it before anything starts;
any other failure prints the log's tail, stops what this start started and exits 1.  So ``stop --only a``
then ``start`` restarts one instance (a rolling restart, one instance at a time).  Ports are chosen free
(``--port 0`` for nginx too; its default is 8080), or given.  ``STATE/deploy.json`` keeps the
configuration: a later ``start`` reuses the root, ports and options it does not give again (and refuses
other ones while the deployment runs).  Every process runs in its own session (it outlives this
script; the terminal's Ctrl-C does not reach it); nginx runs with ``daemon off`` and its pid file, error
and access logs and temporary paths in the state directory.  As root, nginx's workers run as ``nobody``
and memcached gets ``-u nobody``; the instances run as the caller.

``stop`` stops nginx gracefully (SIGQUIT), then the instances (SIGTERM: they stop accepting and finish
the work in flight within their ``--grace``), then memcached; a process still there after its deadline
is killed with its process group (exit status 1).  ``status`` exits 0 when every part runs and answers.
Processes are identified by pid and start time (``/proc``), so a recycled pid is never signalled.

Only the standard library: this script starts in a few tens of milliseconds.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TEMPLATE = HERE / "nginx.conf.template"
DEFAULT_STATE = HERE / "state"
STATE_FILE = "deploy.json"
HOST = "127.0.0.1"

#: Seconds each part may take to answer after it was started.
START_TIMEOUT = 30.0
#: imgserver's --grace (seconds it may take to finish work in flight when stopped).
GRACE = 10.0
#: Beyond its own deadline, seconds a process may take to exit before it is killed.
STOP_MARGIN = 5.0
NGINX_STOP = 10.0 + STOP_MARGIN  # worker_shutdown_timeout in the template, + margin
MEMCACHED_STOP = 5.0

__all__ = ["main"]


class DeployError(Exception):
    """A part could not be started, or the state directory is not usable: printed, exit status 1."""


# ---------------------------------------------------------------------------
# Processes


def _proc_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), None if gone.

    With the pid it names one process: a pid recycled by another process has another start time.
    A zombie (exited, not reaped yet: our parts are re-parented when this script exits) counts as gone.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2:].split()  # after "pid (comm) "
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


@dataclass
class Proc:
    """One started part: how to find it again and how to stop it."""

    name: str
    pid: int
    start_time: int | None
    argv: list[str]
    log: str

    def alive(self) -> bool:
        if sys.platform.startswith("linux"):
            return self.start_time is not None and _proc_start_time(self.pid) == self.start_time
        try:  # elsewhere: no start time to compare; trust the pid
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def signal(self, sig: int, group: bool = False) -> None:
        if not self.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(self.pid, sig)  # each part is a session (and process group) leader
            else:
                os.kill(self.pid, sig)

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "start_time": self.start_time, "argv": self.argv, "log": self.log}

    @classmethod
    def from_json(cls, name: str, data: dict[str, Any]) -> "Proc":
        return cls(name, int(data["pid"]), data.get("start_time"), list(data["argv"]), str(data["log"]))


def _spawn(name: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> Proc:
    """Start ``argv`` in a session of its own, output appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
        out.flush()
        try:
            child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True, close_fds=True, env=env)
        except OSError as e:
            raise DeployError(f"{name}: cannot run {argv[0]}: {e.strerror}") from None
    start = _proc_start_time(child.pid)
    child.returncode = 0  # not ours to wait for once this script exits: no "still running" warning
    return Proc(name, child.pid, start, argv, str(log))


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            text = f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"(no log: {e.strerror})"
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


# ---------------------------------------------------------------------------
# Readiness probes (each bounded by a short socket timeout)


def _memcached_version(port: int, timeout: float = 1.0) -> str | None:
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            s.sendall(b"version\r\n")
            data = b""
            while not data.endswith(b"\r\n"):
                chunk = s.recv(256)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    return data.decode("ascii", "replace").strip() if data.startswith(b"VERSION ") else None


def _http_health(port: int, timeout: float = 2.0) -> tuple[int, dict[str, Any]] | None:
    """GET /healthz: (status, JSON body), or None when nothing answers."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()
    try:
        doc = json.loads(body)
    except ValueError:
        doc = {}
    return response.status, doc if isinstance(doc, dict) else {}


def _wait_ready(proc: Proc, probe: Any, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if not proc.alive():
            raise DeployError(f"{proc.name} exited at start; its log ({proc.log}):\n{_tail(proc.log)}")
        if probe():
            return
        if time.monotonic() > deadline:
            raise DeployError(f"{proc.name} did not answer within {timeout:g} s; its log ({proc.log}):\n"
                              f"{_tail(proc.log)}")
        time.sleep(0.05)


# ---------------------------------------------------------------------------
# State


def _free_ports(count: int) -> list[int]:
    """``count`` distinct ports free on 127.0.0.1 now (held together while chosen)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class State:
    """``STATE/deploy.json``: the deployment's configuration and its running processes."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.path = directory / STATE_FILE
        self.config: dict[str, Any] = {}
        self.procs: dict[str, Proc] = {}
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                self.config = dict(data["config"])
                self.procs = {n: Proc.from_json(n, p) for n, p in data.get("procs", {}).items()}
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise DeployError(f"{self.path} is not a state file of this script ({e})") from None

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"config": self.config,
                                   "procs": {n: p.to_json() for n, p in self.procs.items()}}, indent=1))
        os.replace(tmp, self.path)

    @property
    def instances(self) -> list[str]:
        return list(self.config.get("instances", []))

    def order(self) -> list[str]:
        """Start order: memcached, the instances, nginx (stop goes the other way)."""
        return ["memcached", *self.instances, "nginx"]

    def running(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.alive()]


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One run.py at a time per state directory."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "run.lock", "w") as f:
        deadline = time.monotonic() + 60
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise DeployError(f"another run.py holds {directory / 'run.lock'}") from None
                time.sleep(0.1)
        yield


# ---------------------------------------------------------------------------
# Configuration


def _find(binary: str | None, name: str, fallbacks: Sequence[str]) -> str:
    if binary:
        return binary
    found = shutil.which(name)
    if found:
        return found
    for path in fallbacks:
        if os.access(path, os.X_OK):
            return path
    raise DeployError(f"{name} not found (install Debian's {name} package, or give --{name} PATH)")


def _instance_names(count: int) -> list[str]:
    if not 1 <= count <= 26:
        raise DeployError("--instances must be between 1 and 26")
    return [chr(ord("a") + i) for i in range(count)]


def _imgserver_env(python: str) -> dict[str, str]:
    """The environment of the instances: this checkout importable (it is what the test runs)."""
    env = dict(os.environ)
    if (REPO / "imgserver" / "__init__.py").exists():
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def _supports(python: str, option: str) -> bool:
    """Whether this imgserver knows a command-line option (``--processes`` is newer than some checkouts)."""
    cli = REPO / "imgserver" / "cli.py"
    if python == sys.executable and cli.exists():  # this checkout: read it rather than import it (2 s)
        return f'"{option}"' in cli.read_text()
    try:
        out = subprocess.run([python, "-m", "imgserver", "--help"], capture_output=True, text=True,
                             timeout=30, env=_imgserver_env(python))
    except (OSError, subprocess.TimeoutExpired):
        return False
    return option in out.stdout


def _config(args: argparse.Namespace, previous: dict[str, Any]) -> dict[str, Any]:
    """The configuration of a start: what the command line gives, else what the last start recorded
    (ports included: the URL stays the same across stop/start), else the defaults."""
    def pick(key: str, given: Any, default: Any) -> Any:
        return given if given is not None else previous.get(key, default)

    count = args.instances if args.instances is not None else len(previous.get("instances", ())) or 2
    names = _instance_names(count)
    old_ports = previous.get("ports", {})
    if len(previous.get("instances", ())) != count:
        old_ports = {k: v for k, v in old_ports.items() if k in ("nginx", "memcached")}
    given = [int(p) for p in args.instance_ports.split(",")] if args.instance_ports else []
    if given and len(given) != len(names):
        raise DeployError(f"--instance-ports names {len(given)} ports for {len(names)} instances")
    wanted = {"nginx": args.port if args.port is not None else old_ports.get("nginx", 8080),
              "memcached": args.memcached_port if args.memcached_port is not None else old_ports.get("memcached", 0)}
    wanted.update({n: (given[i] if given else old_ports.get(n, 0)) for i, n in enumerate(names)})
    free = iter(_free_ports(sum(1 for p in wanted.values() if p == 0)))
    ports = {n: (p if p else next(free)) for n, p in wanted.items()}
    if len(set(ports.values())) != len(ports):
        raise DeployError(f"two parts on one port: {ports}")
    python = pick("python", args.python, sys.executable)
    return {
        "root": os.path.abspath(args.root) if args.root else previous.get("root"),
        "instances": names,
        "ports": ports,
        "python": python,
        "nginx_bin": _find(pick("nginx_bin", args.nginx, None), "nginx",
                           ["/usr/sbin/nginx", "/usr/local/sbin/nginx"]),
        "memcached_bin": _find(pick("memcached_bin", args.memcached, None), "memcached",
                               ["/usr/bin/memcached", "/usr/local/bin/memcached"]),
        "memcached_mb": pick("memcached_mb", args.memcached_mb, 64),
        "nginx_workers": pick("nginx_workers", args.nginx_workers, 1),
        "processes_option": _supports(python, "--processes"),
        "imgserver_args": pick("imgserver_args", args.imgserver_args, []),
    }


def _check_same(config: dict[str, Any], args: argparse.Namespace) -> None:
    """A deployment that runs keeps its configuration: refuse a start that asks for another one."""
    asked = {"root": os.path.abspath(args.root) if args.root else None, "port": args.port or None,  # 0: any
             "instances": args.instances, "imgserver_args": args.imgserver_args}
    current = {"root": config["root"], "port": config["ports"]["nginx"],
               "instances": len(config["instances"]), "imgserver_args": config["imgserver_args"]}
    for key, value in asked.items():
        if value is not None and value != current[key]:
            raise DeployError(f"the deployment in this state directory runs with {key}={current[key]!r}; "
                              f"stop it first to change it (asked: {value!r})")


def _grace(config: dict[str, Any]) -> float:
    """The instances' --grace: ours, unless the extra imgserver arguments give another (the last wins)."""
    grace, extra = GRACE, list(config["imgserver_args"])
    for i, arg in enumerate(extra):
        value = extra[i + 1] if arg == "--grace" and i + 1 < len(extra) else (
            arg.split("=", 1)[1] if arg.startswith("--grace=") else None)
        if value is not None:
            with contextlib.suppress(ValueError):
                grace = float(value)
    return grace


def _argv(state: State, name: str) -> tuple[list[str], dict[str, str] | None]:
    config, ports, sdir = state.config, state.config["ports"], state.dir
    root_user = os.geteuid() == 0
    if name == "memcached":
        argv = [config["memcached_bin"], "-l", HOST, "-p", str(ports["memcached"]), "-U", "0",
                "-m", str(config["memcached_mb"]), "-I", "1m", "-c", "1024"]
        return (argv + ["-u", "nobody"] if root_user else argv), None
    if name == "nginx":
        conf = _write_nginx_conf(state)
        return [config["nginx_bin"], "-p", str(sdir / "nginx"), "-e", str(sdir / "nginx" / "error.log"),
                "-c", str(conf)], None
    results = sdir / name / "results"
    results.mkdir(parents=True, exist_ok=True)
    argv = [config["python"], "-m", "imgserver",
            "--http", f"tcp:{ports[name]}:interface={HOST}:backlog=1024", "--pb", "none",
            "--result-dir", str(results), "--memcached", f"{HOST}:{ports['memcached']}",
            "--grace", f"{GRACE:g}", "--quiet"]
    if config["root"]:
        argv += ["--root", config["root"]]
    if config["processes_option"]:
        argv += ["--processes", "1"]
    return argv + list(config["imgserver_args"]), _imgserver_env(config["python"])


def _write_nginx_conf(state: State) -> Path:
    config, sdir = state.config, state.dir
    base = sdir / "nginx"
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (base / "tmp" / sub).mkdir(parents=True, exist_ok=True)
    user = ""
    if os.geteuid() == 0:
        import grp
        import pwd

        nobody = pwd.getpwnam("nobody")
        user = f"user nobody {grp.getgrgid(nobody.pw_gid).gr_name};"
    servers = "\n".join(f"        server {HOST}:{config['ports'][n]} max_fails=1 fail_timeout=5s;"
                        for n in config["instances"])
    values = {"USER": user, "WORKER_PROCESSES": str(config["nginx_workers"]), "STATE": str(sdir),
              "SERVERS": servers, "LISTEN": f"{HOST}:{config['ports']['nginx']}",
              "TRIES": str(len(config["instances"]))}
    text = TEMPLATE.read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    if "{{" in text:
        raise DeployError(f"{TEMPLATE}: a placeholder was not filled in: {text[text.index('{{'):][:40]}")
    path = base / "nginx.conf"
    path.write_text(text)
    return path


def _check_ports(state: State, names: Sequence[str]) -> None:
    """Fail before starting anything when a part's port is taken (SO_REUSEADDR, as the servers bind:
    connections of an earlier run in TIME_WAIT do not count)."""
    for name in names:
        port = state.config["ports"][name]
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((HOST, port))
            except OSError as e:
                raise DeployError(f"{name}'s port {HOST}:{port} is not available ({e.strerror})") from None


def _probe(state: State, name: str) -> bool:
    port = state.config["ports"][name]
    if name == "memcached":
        return _memcached_version(port) is not None
    answer = _http_health(port, timeout=1.0)
    return answer is not None and answer[0] == 200


# ---------------------------------------------------------------------------
# Commands


def start(state: State, args: argparse.Namespace) -> int:
    if state.running() and state.config:
        _check_same(state.config, args)
    else:
        state.config = _config(args, state.config)
        state.procs = {}
    started: list[str] = []
    try:
        _check_ports(state, [n for n in state.order() if not (n in state.procs and state.procs[n].alive())])
        # memcached, then every instance at once (each takes a second or two to import), then nginx.
        for tier in (["memcached"], state.instances, ["nginx"]):
            waiting, already = [], []
            for name in tier:
                proc = state.procs.get(name)
                if proc is not None and proc.alive():
                    # Still starting (an earlier start was interrupted) or hung: it must answer too.
                    print(f"{name}: already running (pid {proc.pid})")
                    waiting.append(proc)
                    already.append(proc)
                    continue
                argv, env = _argv(state, name)
                if name == "nginx":  # check the configuration first: its errors are clearer than a dead child
                    test = subprocess.run(argv + ["-t", "-q"], capture_output=True, text=True, timeout=30)
                    if test.returncode != 0:
                        raise DeployError(f"nginx refuses its configuration:\n{test.stderr.strip()}")
                proc = _spawn(name, argv, state.dir / "logs" / f"{name}.log", env)
                state.procs[name] = proc
                started.append(name)
                state.save()
                waiting.append(proc)
            deadline = time.monotonic() + START_TIMEOUT
            for proc in waiting:
                _wait_ready(proc, lambda name=proc.name: _probe(state, name), max(0.0, deadline - time.monotonic()))
                if proc not in already:
                    print(f"{proc.name}: started (pid {proc.pid}) on {HOST}:{state.config['ports'][proc.name]}")
    except (DeployError, subprocess.TimeoutExpired) as e:
        print(f"start failed: {e}", file=sys.stderr)
        if started:
            print(f"stopping what this start started: {', '.join(started)}", file=sys.stderr)
            _stop(state, started)
        return 1
    print(f"imgserver behind nginx: http://{HOST}:{state.config['ports']['nginx']}/ "
          f"(state in {state.dir})")
    return 0


def _stop_timeout(state: State, name: str) -> float:
    if name == "nginx":
        return NGINX_STOP
    if name == "memcached":
        return MEMCACHED_STOP
    return _grace(state.config) + STOP_MARGIN


def _stop(state: State, names: Sequence[str]) -> bool:
    """Stop these parts (nginx, then the instances together, then memcached); False if one was killed."""
    clean = True
    tiers = [["nginx"], [n for n in state.instances if n in names], ["memcached"]]
    for tier in tiers:
        procs = [state.procs[n] for n in tier if n in names and n in state.procs]
        running = [p for p in procs if p.alive()]
        for proc in running:
            proc.signal(signal.SIGQUIT if proc.name == "nginx" else signal.SIGTERM)
            print(f"{proc.name}: stopping (pid {proc.pid})")
        for proc in procs:
            if proc not in running:
                print(f"{proc.name}: was not running (its log: {proc.log})")
            else:
                timeout = _stop_timeout(state, proc.name)
                deadline = time.monotonic() + timeout
                while proc.alive() and time.monotonic() < deadline:
                    time.sleep(0.02)
                if proc.alive():
                    clean = False
                    print(f"{proc.name}: still running after {timeout:g} s: killed", file=sys.stderr)
                    proc.signal(signal.SIGKILL, group=True)
                else:
                    print(f"{proc.name}: stopped")
            del state.procs[proc.name]
            state.save()
    return clean


def stop(state: State, args: argparse.Namespace) -> int:
    if not state.config:
        print(f"nothing to stop in {state.dir}")
        return 0
    known = state.order()
    names = list(args.only) if args.only else known
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"unknown part(s) {', '.join(unknown)}; this deployment has {', '.join(known)}", file=sys.stderr)
        return 2
    for name in names:
        if name not in state.procs:
            print(f"{name}: not running")
    return 0 if _stop(state, names) else 1


def _status(state: State) -> dict[str, Any]:
    parts: dict[str, Any] = {}
    for name in state.order():
        port = state.config["ports"][name]
        proc = state.procs.get(name)
        part: dict[str, Any] = {"address": f"{HOST}:{port}", "pid": proc.pid if proc else None,
                                "running": bool(proc and proc.alive()), "log": proc.log if proc else None}
        if part["running"]:
            if name == "memcached":
                version = _memcached_version(port)
                part.update(healthy=version is not None, detail=version or "no answer")
            else:
                answer = _http_health(port)
                part.update(healthy=answer is not None and answer[0] == 200,
                            detail=f"/healthz {answer[0]} {answer[1].get('status', '')}".strip()
                            if answer else "no answer")
        else:
            part.update(healthy=False, detail="not running")
        parts[name] = part
    return {"state_dir": str(state.dir), "url": f"http://{HOST}:{state.config['ports']['nginx']}/",
            "root": state.config["root"], "ok": all(p["healthy"] for p in parts.values()), "parts": parts}


def status(state: State, args: argparse.Namespace) -> int:
    if not state.config:
        print(json.dumps({"state_dir": str(state.dir), "ok": False, "parts": {}}) if args.json
              else f"no deployment in {state.dir}")
        return 1
    report = _status(state)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"{report['url']}  (state in {report['state_dir']})")
        for name, part in report["parts"].items():
            pid = part["pid"] if part["running"] else "-"
            print(f"  {name:<10} {part['address']:<22} pid {pid!s:<8} {part['detail']}")
    return 0 if report["ok"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deploy/run.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("start", "stop", "status"):
        p = sub.add_parser(name)
        p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE,
                       help="where configuration, pids, logs, result stores and nginx's files live")
    p_start = sub.choices["start"]
    p_start.add_argument("--root", help="image directory served by every instance (default: the samples)")
    p_start.add_argument("--port", type=int, help="nginx's port on 127.0.0.1 (default 8080; 0: a free one)")
    p_start.add_argument("--instances", type=int, help="imgserver instances (default 2)")
    p_start.add_argument("--instance-ports", help="their ports, comma-separated (default: free ones)")
    p_start.add_argument("--memcached-port", type=int, help="memcached's port (default: a free one)")
    p_start.add_argument("--memcached-mb", type=int, help="memcached's memory (-m), MiB (default 64)")
    p_start.add_argument("--nginx-workers", type=int, help="nginx worker processes (default 1)")
    p_start.add_argument("--nginx", help="nginx binary (default: found on PATH or in /usr/sbin)")
    p_start.add_argument("--memcached", help="memcached binary (default: found on PATH or in /usr/bin)")
    p_start.add_argument("--python", help="Python that runs imgserver (default: this one)")
    p_start.add_argument("imgserver_args", nargs=argparse.REMAINDER,
                         help="after --: more imgserver options for every instance")
    sub.choices["stop"].add_argument("--only", nargs="+", metavar="NAME",
                                     help="stop only these parts (nginx, a, b, ..., memcached)")
    sub.choices["status"].add_argument("--json", action="store_true", help="machine-readable")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "start":  # None: not given (keep the recorded ones); after a bare --: none
        args.imgserver_args = args.imgserver_args[1:] if args.imgserver_args[:1] == ["--"] else (
            args.imgserver_args or None)
    state_dir = args.state_dir.resolve()
    try:
        with _locked(state_dir):
            state = State(state_dir)
            return {"start": start, "stop": stop, "status": status}[args.command](state, args)
    except DeployError as e:
        print(f"{args.command} failed: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
