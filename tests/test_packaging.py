"""asyncfile installs with Twisted alone: it imports nothing outside the standard library and
Twisted's own dependencies (imgserver's Pillow and prometheus_client come with an extra)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import asyncfile

ROOT = Path(__file__).resolve().parent.parent

# Runs in a fresh interpreter: a meta-path finder refuses every top-level module that is not
# in the standard library, not asyncfile and not installed by `pip install twisted` (Twisted's
# requirements, followed transitively, without extras), then every asyncfile module is imported.
_CHILD = r"""
import importlib, importlib.metadata as md, json, pkgutil, re, sys

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

def closure(dist):
    seen, todo = set(), [dist]
    while todo:
        name = norm(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for req in requires:
            if "extra ==" in req.replace("extra==", "extra =="):
                continue
            todo.append(re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0])
    return seen

allowed_dists = closure("twisted")
allowed = set(sys.stdlib_module_names) | {"asyncfile", "__main__"}
for module, dists in md.packages_distributions().items():
    if any(norm(d) in allowed_dists for d in dists):
        allowed.add(module)

refused = []

class Refuse:
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top not in allowed:
            refused.append(name)
            raise ModuleNotFoundError(f"refused by the test: {name}", name=name)
        return None

sys.meta_path.insert(0, Refuse())

import asyncfile
failed, imported = {}, []
names = ["asyncfile"] + [m.name for m in pkgutil.walk_packages(asyncfile.__path__, "asyncfile.",
                                                              onerror=lambda n: failed.setdefault(n, "walk"))]
for name in names:
    try:
        importlib.import_module(name)
        imported.append(name)
    except BaseException as exc:
        failed[name] = f"{type(exc).__name__}: {exc}"
print(json.dumps({"imported": imported, "failed": failed, "refused": sorted(set(refused)),
                  "allowed_dists": sorted(allowed_dists)}))
"""


def test_asyncfile_imports_with_twisted_alone() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD],
        cwd=str(ROOT),
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "twisted" in report["allowed_dists"]
    assert report["failed"] == {}, report
    # Every module was imported, asyncfile.__main__ and the testing helpers included.
    assert "asyncfile.loader" in report["imported"]
    assert "asyncfile.testing.memory" in report["imported"]
    assert "asyncfile.__main__" in report["imported"]
    # Optional test-only modules (mfusepy) may be tried and handled; imgserver's never are.
    for top in ("PIL", "prometheus_client", "imgserver"):
        assert not [n for n in report["refused"] if n.partition(".")[0] == top], report["refused"]


def test_asyncfile_exports_its_version() -> None:
    assert isinstance(asyncfile.__version__, str) and asyncfile.__version__
    assert "__version__" in asyncfile.__all__


def test_imgserver_without_its_extra_names_the_extra() -> None:
    """``pip install .`` installs the imgserver package too; without Pillow it
    says which extra to install instead of failing deep inside an import."""
    child = (
        "import sys\n"
        "class Refuse:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] == 'PIL':\n"
        "            raise ModuleNotFoundError('refused by the test', name=name)\n"
        "sys.meta_path.insert(0, Refuse())\n"
        "import imgserver.cli\n"
    )
    proc = subprocess.run([sys.executable, "-c", child], cwd=str(ROOT), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0
    assert "asyncfile-imgserver[imgserver]" in proc.stderr and "'PIL'" in proc.stderr, proc.stderr
