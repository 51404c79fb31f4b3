"""Tests of asyncfile.confine: opening paths beneath a root, kernel-confined.

Both methods run the same cases ("openat2" is skipped only where the probe
says it is unusable). Every error case also checks that no descriptor leaked
and that the error names the relative path, never the root's absolute path.
"""

from __future__ import annotations

import errno
import gc
import itertools
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncfile import confine
from asyncfile.confine import (
    RESOLVE_BENEATH,
    RESOLVE_NO_MAGICLINKS,
    RESOLVE_NO_SYMLINKS,
    OutsideRoot,
    check_relative,
    confinement_method,
    escape_error,
    open_beneath,
    open_root,
    openat2,
    openat2_unavailable_reason,
    resolve_flags,
)

pytestmark = pytest.mark.timeout(60)

REASON = openat2_unavailable_reason()
needs_openat2 = pytest.mark.skipif(
    REASON is not None, reason=f"openat2 unusable: {REASON}")
REPO = Path(__file__).resolve().parents[2]


def open_fds() -> set[str]:
    """This process's descriptors (without the one listdir itself used)."""
    return {fd for fd in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{fd}")}


def fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def make_tree(base: Path) -> Path:
    """root/ and, beside it, outside/ (what every escape would reach)."""
    root = base / "root"
    outside = base / "outside"
    (root / "a" / "b").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    (root / "top.txt").write_text("top")
    (root / "a" / "f.txt").write_text("f")
    (root / "a" / "b" / "deep.txt").write_text("deep")
    (root / "in_link").symlink_to("a/f.txt")
    (root / "dir_link").symlink_to("a")
    (root / "out_link").symlink_to("../outside/secret.txt")
    (root / "abs_link").symlink_to(outside / "secret.txt")
    (root / "out_dir").symlink_to("../outside")
    (root / "dangling").symlink_to("nope")
    (root / "dangling_out").symlink_to("../outside/nope")
    return root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path)


@pytest.fixture
def root_fd(tree: Path):
    fd = open_root(str(tree))
    yield fd
    os.close(fd)


@pytest.fixture(params=["openat2", "walk"])
def method(request) -> str:
    if request.param == "openat2" and REASON is not None:
        pytest.skip(f"openat2 unusable: {REASON}")
    return request.param


def read_beneath(dirfd: int, path: str, method: str, **kw) -> str:
    fd = open_beneath(dirfd, path, os.O_RDONLY, method=method, **kw)
    try:
        return os.read(fd, 100).decode()
    finally:
        os.close(fd)


def expect_error(dirfd: int, path, method: str, exc: type[BaseException],
                 err: int | None = None, *, flags: int = os.O_RDONLY,
                 root: Path | None = None, **kw) -> BaseException:
    """Open must raise ``exc`` (with ``err``), leak nothing, hide the root."""
    before = open_fds()
    with pytest.raises(exc) as info:
        fd = open_beneath(dirfd, path, flags, method=method, **kw)
        os.close(fd)
    assert open_fds() == before
    e = info.value
    assert type(e) is exc
    if err is not None:
        assert e.errno == err
    if isinstance(e, OSError):
        assert e.filename == os.fsdecode(path)
    if root is not None and not os.fsdecode(path).startswith("/"):
        assert str(root) not in str(e)
        assert str(root) not in repr(e)
    return e


# --- plain opens -------------------------------------------------------------------


def test_normal_and_nested_files(root_fd, method, tree):
    assert read_beneath(root_fd, "top.txt", method) == "top"
    assert read_beneath(root_fd, "a/f.txt", method) == "f"
    assert read_beneath(root_fd, "a/b/deep.txt", method) == "deep"
    assert read_beneath(root_fd, b"a/b/deep.txt", method) == "deep"


def test_dots_and_repeated_slashes(root_fd, method, tree):
    assert read_beneath(root_fd, "./a//b/./deep.txt", method) == "deep"
    assert read_beneath(root_fd, "a///f.txt", method) == "f"
    for path in (".", "./", ".//.", "a/.", "a/b/"):
        fd = open_beneath(root_fd, path, os.O_RDONLY, method=method)
        try:
            assert stat.S_ISDIR(os.fstat(fd).st_mode)
            want = tree / path.replace(".", "").strip("/")
            assert fd_path(fd) == str(want).rstrip("/")
        finally:
            os.close(fd)


def test_descriptor_is_not_inheritable(root_fd, method):
    fd = open_beneath(root_fd, "a/f.txt", os.O_RDONLY, method=method)
    try:
        assert not os.get_inheritable(fd)
    finally:
        os.close(fd)


def test_o_path_opens(root_fd, method, tree):
    fd = open_beneath(root_fd, "a/b/deep.txt", os.O_PATH, method=method)
    try:
        assert fd_path(fd) == str(tree / "a/b/deep.txt")
    finally:
        os.close(fd)


def test_create_with_mode(root_fd, method, tree):
    old = os.umask(0o022)
    try:
        fd = open_beneath(root_fd, "a/new.txt", os.O_CREAT | os.O_WRONLY,
                          method=method, mode=0o640)
    finally:
        os.umask(old)
    os.write(fd, b"x")
    os.close(fd)
    assert (tree / "a/new.txt").read_bytes() == b"x"
    assert stat.S_IMODE((tree / "a/new.txt").stat().st_mode) == 0o640


# --- escapes by name -----------------------------------------------------------------


@pytest.mark.parametrize("path", [
    "..", "../outside/secret.txt", "a/../../outside/secret.txt", "a/../..",
    "./..", "a/b/../../..",
    # Inside, yet refused: ".." is never accepted (see the module docstring).
    "a/..", "a/../top.txt",
])
def test_dotdot_refused(root_fd, method, tree, path):
    expect_error(root_fd, path, method, OutsideRoot, errno.EXDEV, root=tree)


@pytest.mark.parametrize("path", ["/etc/passwd", "/", "//a"])
def test_absolute_refused(root_fd, method, path):
    expect_error(root_fd, path, method, OutsideRoot, errno.EXDEV)


def test_absolute_path_of_a_file_inside_refused(root_fd, method, tree):
    expect_error(root_fd, str(tree / "top.txt"), method, OutsideRoot,
                 errno.EXDEV)


def test_nul_is_value_error(root_fd, method):
    before = open_fds()
    with pytest.raises(ValueError):
        open_beneath(root_fd, "a/\0f.txt", os.O_RDONLY, method=method)
    with pytest.raises(ValueError):
        open_beneath(root_fd, b"a\0", os.O_RDONLY, method=method)
    assert open_fds() == before


def test_empty_path_not_found(root_fd, method, tree):
    expect_error(root_fd, "", method, FileNotFoundError, errno.ENOENT,
                 root=tree)


# --- symlinks ------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["in_link", "dir_link/f.txt", "dir_link/b/deep.txt"])
def test_symlink_inside(root_fd, method, tree, path):
    if method == "openat2":  # followed: it stays beneath the root
        assert read_beneath(root_fd, path, method) in ("f", "deep")
        expect_error(root_fd, path, method, OutsideRoot, errno.ELOOP,
                     root=tree, no_symlinks=True)
    else:  # the walk refuses every symlink
        expect_error(root_fd, path, method, OutsideRoot, errno.ELOOP,
                     root=tree)
        expect_error(root_fd, path, method, OutsideRoot, errno.ELOOP,
                     root=tree, no_symlinks=True)


@pytest.mark.parametrize("path", [
    "out_link", "abs_link", "out_dir/secret.txt", "out_dir", "out_dir/",
    "dangling_out",
])
def test_symlink_leading_outside(root_fd, method, tree, path):
    # openat2 reports the escape (EXDEV); the walk refuses the link (ELOOP).
    want = errno.EXDEV if method == "openat2" else errno.ELOOP
    expect_error(root_fd, path, method, OutsideRoot, want, root=tree)
    expect_error(root_fd, path, method, OutsideRoot, want, root=tree,
                 flags=os.O_PATH)
    expect_error(root_fd, path, method, OutsideRoot, errno.ELOOP, root=tree,
                 no_symlinks=True)


def test_symlinked_intermediate_directory_outside(tmp_path, method):
    root = make_tree(tmp_path)
    (root / "a" / "up").symlink_to("../../outside")
    fd = open_root(str(root))
    try:
        want = errno.EXDEV if method == "openat2" else errno.ELOOP
        expect_error(fd, "a/up/secret.txt", method, OutsideRoot, want,
                     root=root)
        expect_error(fd, "dir_link/up/secret.txt", method, OutsideRoot, want,
                     root=root)
    finally:
        os.close(fd)


def test_dangling_symlink(root_fd, method, tree):
    if method == "openat2":  # the target would be inside: just missing
        expect_error(root_fd, "dangling", method, FileNotFoundError,
                     errno.ENOENT, root=tree)
    else:
        expect_error(root_fd, "dangling", method, OutsideRoot, errno.ELOOP,
                     root=tree)


def test_create_through_symlink_never_writes_outside(root_fd, method, tree):
    want = errno.EXDEV if method == "openat2" else errno.ELOOP
    expect_error(root_fd, "dangling_out", method, OutsideRoot, want,
                 flags=os.O_CREAT | os.O_WRONLY, root=tree)
    assert not (tree.parent / "outside" / "nope").exists()


def test_o_path_on_a_symlink(root_fd, method, tree):
    """O_PATH|O_NOFOLLOW would open the link itself: the walk must notice."""
    if method == "openat2":
        fd = open_beneath(root_fd, "in_link", os.O_PATH, method=method)
        assert fd_path(fd) == str(tree / "a/f.txt")
        os.close(fd)
    else:
        expect_error(root_fd, "in_link", method, OutsideRoot, errno.ELOOP,
                     flags=os.O_PATH, root=tree)


def test_symlink_loop_is_refused(tmp_path, method):
    root = tmp_path / "root"
    root.mkdir()
    (root / "x").symlink_to("y")
    (root / "y").symlink_to("x")
    fd = open_root(str(root))
    try:
        expect_error(fd, "x", method, OutsideRoot, errno.ELOOP, root=root)
    finally:
        os.close(fd)


# --- magic links ------------------------------------------------------------------


@pytest.mark.parametrize("path", ["fd/0", "cwd", "cwd/x", "root/etc/passwd",
                                  "exe", "fd/0/"])
def test_magic_links_refused(method, path):
    fd = open_root("/proc/self")
    try:
        expect_error(fd, path, method, OutsideRoot, errno.ELOOP)
        if method == "openat2":
            expect_error(fd, path, method, OutsideRoot, errno.ELOOP,
                         no_symlinks=True)
        ok = open_beneath(fd, "status", os.O_RDONLY, method=method)
        os.close(ok)
    finally:
        os.close(fd)


def test_magic_link_through_an_ordinary_symlink(method):
    """/proc/self is an ordinary symlink, /proc/self/fd/0 a magic one."""
    fd = open_root("/proc")
    try:
        want = errno.ELOOP
        expect_error(fd, "self/fd/0", method, OutsideRoot, want)
    finally:
        os.close(fd)


@needs_openat2
def test_raw_openat2_with_beneath_only_refuses_magic_links_too():
    fd = open_root("/proc/self")
    try:
        with pytest.raises(OSError) as info:
            openat2(fd, "fd/0", os.O_RDONLY, 0, RESOLVE_BENEATH)
        assert info.value.errno == errno.EXDEV
        assert isinstance(escape_error(info.value, "fd/0"), OutsideRoot)
        with pytest.raises(OSError) as info:
            openat2(fd, "fd/0", os.O_RDONLY, 0,
                    RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)
        assert info.value.errno == errno.ELOOP
    finally:
        os.close(fd)


# --- trailing slashes and not-found -------------------------------------------------


def test_trailing_slash(root_fd, method, tree):
    fd = open_beneath(root_fd, "a/", os.O_RDONLY, method=method)
    os.close(fd)
    for path in ("top.txt/", "a/f.txt/", "a/f.txt/.", "top.txt//"):
        expect_error(root_fd, path, method, NotADirectoryError, errno.ENOTDIR,
                     root=tree)
    expect_error(root_fd, "a/", method, IsADirectoryError, errno.EISDIR,
                 flags=os.O_CREAT | os.O_WRONLY, root=tree)
    expect_error(root_fd, "brand_new/", method, IsADirectoryError,
                 errno.EISDIR, flags=os.O_CREAT | os.O_WRONLY, root=tree)
    assert not (tree / "brand_new").exists()
    if method == "openat2":
        fd = open_beneath(root_fd, "dir_link/", os.O_RDONLY, method=method)
        assert fd_path(fd) == str(tree / "a")
        os.close(fd)
    else:
        expect_error(root_fd, "dir_link/", method, OutsideRoot, errno.ELOOP,
                     root=tree)


@pytest.mark.parametrize(("path", "exc", "err"), [
    ("missing", FileNotFoundError, errno.ENOENT),
    ("a/missing", FileNotFoundError, errno.ENOENT),
    ("a/missing/x", FileNotFoundError, errno.ENOENT),
    ("a/b/missing/deeper/x", FileNotFoundError, errno.ENOENT),
    ("top.txt/x", NotADirectoryError, errno.ENOTDIR),
    ("a/f.txt/x/y", NotADirectoryError, errno.ENOTDIR),
])
def test_errors_keep_their_type(root_fd, method, tree, path, exc, err):
    e = expect_error(root_fd, path, method, exc, err, root=tree)
    assert not isinstance(e, OutsideRoot)


def test_directory_opened_for_writing(root_fd, method, tree):
    expect_error(root_fd, "a/b", method, IsADirectoryError, errno.EISDIR,
                 flags=os.O_WRONLY, root=tree)


def test_o_directory_on_a_file(root_fd, method, tree):
    expect_error(root_fd, "a/f.txt", method, NotADirectoryError,
                 errno.ENOTDIR, flags=os.O_RDONLY | os.O_DIRECTORY, root=tree)


def test_permission_denied_is_not_outside_root(tmp_path, method):
    """A real EACCES stays a plain PermissionError (checked as nobody)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to nobody in a child")
    root = make_tree(tmp_path)
    os.chmod(root / "a" / "b", 0o700)
    os.chmod(tmp_path, 0o755)
    code = f"""
import os, sys
sys.path.insert(0, {str(REPO)!r})
from asyncfile.confine import open_beneath, open_root, OutsideRoot
root = open_root({str(root)!r})
os.setuid(65534)
try:
    open_beneath(root, "a/b/deep.txt", os.O_RDONLY, method={method!r})
except OutsideRoot:
    print("outside")
except PermissionError as e:
    print("denied", e.errno, e.filename)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, timeout=30, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["denied", str(errno.EACCES), "a/b/deep.txt"]


# --- descriptors on every path -------------------------------------------------------


@pytest.mark.parametrize("failing_call", [1, 2, 3])
@pytest.mark.parametrize("exc", [MemoryError, KeyboardInterrupt,
                                 FileNotFoundError])
def test_walk_closes_descriptors_on_any_exception(root_fd, monkeypatch,
                                                  failing_call, exc):
    real_open = confine._os_open
    calls = []

    def flaky_open(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == failing_call:
            raise exc()
        return real_open(*args, **kwargs)

    monkeypatch.setattr(confine, "_os_open", flaky_open)
    before = open_fds()
    with pytest.raises(exc):
        open_beneath(root_fd, "a/b/deep.txt", os.O_RDONLY, method="walk")
    assert open_fds() == before
    assert len(calls) == failing_call


@pytest.mark.parametrize(("patched", "path", "flags"), [
    ("stat", "a/lnk/deep.txt", os.O_RDONLY),  # classifying an ENOTDIR
    ("fstat", "a/b/deep.txt", os.O_PATH),  # is the O_PATH result a link?
])
def test_walk_closes_descriptors_when_its_checks_raise(
        tree, root_fd, monkeypatch, patched, path, flags):
    (tree / "a" / "lnk").symlink_to("b")

    def boom(*args, **kwargs):
        raise MemoryError

    before = open_fds()
    monkeypatch.setattr(confine.os, patched, boom)
    try:
        with pytest.raises(MemoryError):
            open_beneath(root_fd, path, flags, method="walk")
    finally:
        monkeypatch.undo()
    assert open_fds() == before


def test_walk_success_keeps_only_the_result(root_fd):
    before = open_fds()
    fd = open_beneath(root_fd, "a/b/deep.txt", os.O_RDONLY, method="walk")
    assert open_fds() == before | {str(fd)}
    os.close(fd)


# --- choosing the method -------------------------------------------------------------


@pytest.fixture
def fresh_probe(monkeypatch):
    """Let a test change the cached probe answer; restored afterwards."""
    monkeypatch.setattr(confine, "_reason", confine._reason)


def test_probe_is_cached_and_method_reported():
    assert openat2_unavailable_reason() is openat2_unavailable_reason()
    expected = "openat2" if REASON is None else "walk"
    assert confinement_method() == expected


def test_walk_chosen_when_openat2_unavailable(root_fd, monkeypatch,
                                              fresh_probe):
    monkeypatch.setattr(confine, "openat2_unavailable_reason",
                        lambda: "ENOSYS: pretend")

    def must_not_call(*args, **kwargs):
        raise AssertionError("openat2 called although unavailable")

    monkeypatch.setattr(confine, "openat2", must_not_call)
    assert confinement_method() == "walk"
    assert read_beneath(root_fd, "a/f.txt", "auto") == "f"
    # The walk's signature: a symlink inside is refused.
    expect_error(root_fd, "in_link", "auto", OutsideRoot, errno.ELOOP)


@needs_openat2
def test_enosys_at_call_time_falls_back_to_walk(root_fd, monkeypatch,
                                                fresh_probe):
    def enosys(*args, **kwargs):
        raise OSError(errno.ENOSYS, "Function not implemented", args[1])

    monkeypatch.setattr(confine, "openat2", enosys)
    assert confinement_method() == "openat2"
    # Explicitly asking for openat2 gets the error, not a fallback.
    expect_error(root_fd, "a/f.txt", "openat2", OSError, errno.ENOSYS)
    assert read_beneath(root_fd, "a/f.txt", "auto") == "f"
    assert confinement_method() == "walk"
    assert openat2_unavailable_reason().startswith("ENOSYS")


@needs_openat2
def test_seccomp_like_eperm_falls_back_to_walk(root_fd, monkeypatch,
                                               fresh_probe):
    def eperm(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted", args[1])

    monkeypatch.setattr(confine, "openat2", eperm)
    assert read_beneath(root_fd, "a/f.txt", "auto") == "f"
    assert confinement_method() == "walk"
    assert openat2_unavailable_reason().startswith("EPERM")


@needs_openat2
def test_real_eperm_is_a_permission_error(root_fd, monkeypatch, fresh_probe):
    """EPERM about the file (the syscall still works) is not a fallback."""
    real = confine.openat2

    def eperm_for_the_file(dirfd, path, *args, **kwargs):
        if path == "a/f.txt":
            raise OSError(errno.EPERM, "Operation not permitted", path)
        return real(dirfd, path, *args, **kwargs)

    monkeypatch.setattr(confine, "openat2", eperm_for_the_file)
    e = expect_error(root_fd, "a/f.txt", "auto", PermissionError, errno.EPERM)
    assert not isinstance(e, OutsideRoot)
    assert confinement_method() == "openat2"


@needs_openat2
def test_eagain_is_retried(root_fd, monkeypatch):
    real = confine.openat2
    calls = []

    def busy_then_fine(*args, **kwargs):
        calls.append(1)
        if len(calls) < 3:
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        return real(*args, **kwargs)

    monkeypatch.setattr(confine, "openat2", busy_then_fine)
    assert read_beneath(root_fd, "a/f.txt", "openat2") == "f"
    assert len(calls) == 3


def test_unknown_method_refused(root_fd):
    with pytest.raises(ValueError):
        open_beneath(root_fd, "a/f.txt", os.O_RDONLY, method="magic")


# A child installs a seccomp filter making openat2 (437 on x86-64) fail with
# the given errno, either before the first probe or after it, and reports.
_SECCOMP_CHILD = r"""
import ctypes, os, struct, sys
err, when, root = int(sys.argv[1]), sys.argv[2], sys.argv[3]

def block_openat2():
    AUDIT_ARCH_X86_64 = 0xC000003E
    prog = [  # (code, jt, jf, k)
        (0x20, 0, 0, 4),                   # ld [arch]
        (0x15, 0, 3, AUDIT_ARCH_X86_64),   # jeq arch, else allow
        (0x20, 0, 0, 0),                   # ld [nr]
        (0x15, 0, 1, 437),                 # jeq openat2, else allow
        (0x6, 0, 0, 0x00050000 | err),     # ret ERRNO(err)
        (0x6, 0, 0, 0x7FFF0000),           # ret ALLOW
    ]
    filt = ctypes.create_string_buffer(
        b"".join(struct.pack("=HBBI", *i) for i in prog))
    fprog = ctypes.create_string_buffer(
        struct.pack("@HP", len(prog), ctypes.addressof(filt)))
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(38, 1, 0, 0, 0) == 0, ctypes.get_errno()
    assert libc.prctl(22, 2, fprog, 0, 0) == 0, ctypes.get_errno()

from asyncfile import confine
if when == "before":
    block_openat2()
else:
    assert confine.openat2_unavailable_reason() is None
    block_openat2()
fd = confine.open_root(root)
data = os.read(confine.open_beneath(fd, "a/f.txt", os.O_RDONLY), 10)
try:
    confine.open_beneath(fd, "in_link", os.O_RDONLY)
    link = "opened"
except confine.OutsideRoot as e:
    link = f"refused-{e.errno}"
print(data.decode(), link, confine.confinement_method(),
      confine.openat2_unavailable_reason(), sep="|")
"""


@needs_openat2
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86-64 filter")
@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize(("err", "expected"), [
    (errno.EPERM, "EPERM: blocked by seccomp"),
    (errno.ENOSYS, "ENOSYS: kernel older than 5.6"),
])
def test_real_seccomp_filter_selects_walk(tree, when, err, expected):
    out = subprocess.run(
        [sys.executable, "-c", _SECCOMP_CHILD, str(err), when, str(tree)],
        capture_output=True, text=True, timeout=30, cwd=REPO)
    assert out.returncode == 0, out.stderr
    data, link, method, reason = out.stdout.strip().split("|")
    assert data == "f"
    assert link == f"refused-{errno.ELOOP}"  # the walk's strictness
    assert method == "walk"
    assert reason.startswith(expected)


# --- the building blocks ------------------------------------------------------------


def test_constants_and_resolve_flags():
    assert (confine.RESOLVE_NO_XDEV, RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS,
            RESOLVE_BENEATH) == (0x01, 0x02, 0x04, 0x08)
    assert resolve_flags() == RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS
    assert resolve_flags(no_symlinks=True) == (
        RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS)


def test_open_root(tree):
    fd = open_root(str(tree))
    try:
        assert fd_path(fd) == str(tree)
        assert os.fstat(fd).st_ino == tree.stat().st_ino
        assert not os.get_inheritable(fd)
    finally:
        os.close(fd)
    with pytest.raises(NotADirectoryError):
        open_root(str(tree / "top.txt"))
    with pytest.raises(FileNotFoundError):
        open_root(str(tree / "missing"))


def test_check_relative():
    for ok in ("a", "a/b", "./a", "a//b/", ".", "a/.b", "..a", "a..", "...",
               b"a/b"):
        check_relative(ok)
    for bad in ("..", "../a", "a/..", "a/../b", "/a", "/", "a/b/../.."):
        with pytest.raises(OutsideRoot) as info:
            check_relative(bad)
        assert info.value.errno == errno.EXDEV
        assert info.value.filename == bad
    with pytest.raises(FileNotFoundError):
        check_relative("")
    with pytest.raises(ValueError):
        check_relative("a\0b")


def test_outside_root_is_a_permission_error():
    e = escape_error(OSError(errno.EXDEV, "Invalid cross-device link",
                             "/srv/root/x"), "x")
    assert isinstance(e, OutsideRoot) and isinstance(e, PermissionError)
    assert (e.errno, e.filename) == (errno.EXDEV, "x")
    assert "/srv/root" not in str(e)


def test_escape_error_mapping():
    e = escape_error(OSError(errno.ENOENT, "No such file or directory", "b"),
                     "a/b")
    assert type(e) is FileNotFoundError and e.filename == "a/b"
    e = escape_error(OSError(errno.ELOOP, "Too many levels"), "l")
    assert type(e) is OutsideRoot and e.errno == errno.ELOOP
    # Without NO_SYMLINKS / NO_MAGICLINKS an ELOOP is just a symlink loop.
    e = escape_error(OSError(errno.ELOOP, "Too many levels"), "l",
                     resolve=RESOLVE_BENEATH)
    assert type(e) is OSError and e.errno == errno.ELOOP
    e = escape_error(OSError(errno.EACCES, "Permission denied"), "p")
    assert type(e) is PermissionError and not isinstance(e, OutsideRoot)
    odd = OSError("no errno")
    assert escape_error(odd, "x") is odd


@needs_openat2
def test_raw_openat2(root_fd, tree):
    fd = openat2(root_fd, "a/f.txt", os.O_RDONLY, 0, resolve_flags())
    try:
        assert os.read(fd, 10) == b"f"
        assert not os.get_inheritable(fd)
    finally:
        os.close(fd)
    before = open_fds()
    for path in ("..", "a/../../outside/secret.txt", str(tree / "top.txt"),
                 "out_link", "out_dir/secret.txt"):
        with pytest.raises(OSError) as info:
            openat2(root_fd, path, os.O_RDONLY, 0, resolve_flags())
        assert info.value.errno == errno.EXDEV
        assert info.value.filename == path
    # The kernel's own resolution keeps ".." that stays inside.
    os.close(openat2(root_fd, "a/../top.txt", os.O_RDONLY, 0, resolve_flags()))
    with pytest.raises(OSError) as info:  # mode without O_CREAT
        openat2(root_fd, "a/f.txt", os.O_RDONLY, 0o644, resolve_flags())
    assert info.value.errno == errno.EINVAL
    with pytest.raises(ValueError):
        openat2(root_fd, "a\0", os.O_RDONLY)
    assert open_fds() == before


# --- io_uring's IORING_OP_OPENAT2 --------------------------------------------------


def _uring_reason() -> str | None:
    from asyncfile.engines import _uring

    reason = _uring.probe()
    if reason is not None:
        return f"io_uring unusable: {reason}"
    with _uring.Ring(4) as ring:
        if _uring.IORING_OP_OPENAT2 not in ring.supported_ops():
            return "IORING_OP_OPENAT2 unsupported"
    return None


@pytest.mark.parametrize("force_async", [False, True])
def test_ring_prep_openat2(tree, root_fd, force_async):
    reason = _uring_reason()
    if reason:
        pytest.skip(reason)
    from asyncfile.engines._uring import Ring

    proc = open_root("/proc/self")
    ring = Ring(16)
    try:
        # Paths built at run time, so nothing but the ring holds them.
        cases = {
            1: (root_fd, "/".join(["a", "b", "deep.txt"])),
            2: (root_fd, "/".join(["..", "outside", "secret.txt"])),
            3: (root_fd, "out" + "_link"),
            4: (root_fd, "dir" + "_link/f.txt"),
            5: (proc, "fd/" + "0"),
            6: (root_fd, "missing" * 3),
        }
        for ud, (dirfd, path) in cases.items():
            ring.prep_openat2(dirfd, path, os.O_RDONLY, 0, resolve_flags(),
                              ud, force_async=force_async)
        ring.prep_openat2(root_fd, "a/f.txt", os.O_RDONLY, 0,
                          resolve_flags(no_symlinks=True), 7)
        ring.prep_openat2(root_fd, "dir_link/f.txt", os.O_RDONLY, 0,
                          resolve_flags(no_symlinks=True), 8)
        ring.prep_openat2(root_fd, "a/f.txt", os.O_RDONLY, 0o644,
                          resolve_flags(), 9)  # mode without O_CREAT
        assert ring.in_flight == 9
        del cases, path
        gc.collect()
        junk = [os.urandom(32) for _ in range(10_000)]  # reuse freed memory
        del junk
        assert ring.submit() == 9
        done = dict(ring.wait(9, timeout=5.0))
        assert len(done) == 9, done
        assert ring.in_flight == 0
        for ud in (1, 4, 7):
            assert done[ud] >= 0, (ud, done[ud])
        try:
            assert os.read(done[1], 10) == b"deep"
            assert os.read(done[4], 10) == b"f"
            assert os.read(done[7], 10) == b"f"
            assert not os.get_inheritable(done[1])
        finally:
            for ud in (1, 4, 7):
                os.close(done[ud])
        assert done[2] == -errno.EXDEV
        assert done[3] == -errno.EXDEV
        assert done[5] == -errno.ELOOP
        assert done[6] == -errno.ENOENT
        assert done[8] == -errno.ELOOP
        assert done[9] == -errno.EINVAL
    finally:
        ring.close()
        os.close(proc)


def test_ring_keeps_open_how_and_path_until_reaped(root_fd):
    reason = _uring_reason()
    if reason:
        pytest.skip(reason)
    from asyncfile.engines._uring import Ring

    with Ring(4) as ring:
        ring.prep_openat2(root_fd, "a/" + "f.txt", os.O_RDONLY, 0,
                          resolve_flags(), 42)
        keep = ring._inflight[42]
        assert keep.path.value == b"a/f.txt"
        assert (keep.flags & os.O_CLOEXEC, keep.resolve) == (
            os.O_CLOEXEC, resolve_flags())
        del keep
        gc.collect()
        ring.submit()
        ((ud, res),) = ring.wait(1, timeout=5.0)
        assert ud == 42 and res >= 0
        os.close(res)
        assert 42 not in ring._inflight
        with pytest.raises(ValueError):
            ring.prep_openat2(root_fd, "a\0", os.O_RDONLY, 0, 0, 43)
        assert ring.in_flight == 0


# --- property: openat2 and the walk agree (the walk being stricter) ---------------

COMPONENTS = ["a", "b", ".", "..", "link_in", "link_out", ""]
FLAGS = [os.O_RDONLY, os.O_PATH, os.O_RDONLY | os.O_DIRECTORY]


@pytest.fixture(scope="module")
def prop_tree(tmp_path_factory):
    base = tmp_path_factory.mktemp("prop")
    root, outside = base / "root", base / "outside"
    for top in (root, outside):
        (top / "a" / "a").mkdir(parents=True)
        (top / "a" / "a" / "b").write_text("aab")
        (top / "a" / "b").write_text("ab")
        (top / "b").write_text("b")
    (root / "link_in").symlink_to("a")
    (root / "link_out").symlink_to("../outside")
    (root / "a" / "link_in").symlink_to("b")
    (root / "a" / "link_out").symlink_to(outside / "a")
    (root / "a" / "a" / "link_in").symlink_to("../link_in")
    (root / "a" / "a" / "link_out").symlink_to("../../link_out/b")
    fd = open_root(str(root))
    yield root, fd
    os.close(fd)


def outcome(dirfd: int, path: str, flags: int, method: str,
            no_symlinks: bool, root: Path):
    """("ok", dev, ino) or ("err", type, errno); checks the confinement."""
    try:
        fd = open_beneath(dirfd, path, flags, method=method,
                          no_symlinks=no_symlinks)
    except (OSError, ValueError) as e:
        if isinstance(e, OSError):
            assert e.filename == path
            assert str(root) not in str(e)
        return ("err", type(e), getattr(e, "errno", None))
    try:
        real = os.path.realpath(fd_path(fd))
        assert real == str(root) or real.startswith(str(root) + "/"), (
            path, method, real)
        st_ = os.fstat(fd)
        return ("ok", st_.st_dev, st_.st_ino)
    finally:
        os.close(fd)


def check_agreement(root: Path, dirfd: int, path: str, flags: int) -> None:
    """openat2 and the walk agree, except where the walk refused a symlink."""
    before = open_fds()
    kernel = outcome(dirfd, path, flags, "openat2", False, root)
    strict = outcome(dirfd, path, flags, "openat2", True, root)
    walk = outcome(dirfd, path, flags, "walk", False, root)
    walk_ns = outcome(dirfd, path, flags, "walk", True, root)
    assert open_fds() == before
    # The walk is exactly openat2 with RESOLVE_NO_SYMLINKS.
    assert walk == walk_ns == strict, path
    refused_link = walk == ("err", OutsideRoot, errno.ELOOP)
    if not refused_link:
        # No symlink met before the walk stopped: openat2 met none either.
        assert kernel == walk, path
    elif kernel[0] == "err":
        # openat2 follows links, so it may fail later, but only this way:
        assert kernel[1] in (OutsideRoot, FileNotFoundError,
                             NotADirectoryError), (path, kernel)


@needs_openat2
@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.sampled_from(COMPONENTS), min_size=1, max_size=6),
       flags=st.sampled_from(FLAGS))
def test_openat2_and_walk_agree(prop_tree, parts, flags):
    root, dirfd = prop_tree
    check_agreement(root, dirfd, "/".join(parts), flags)


@needs_openat2
def test_openat2_and_walk_agree_on_every_short_path(prop_tree):
    """Exhaustive over up to three components (399 paths x 3 flag sets)."""
    root, dirfd = prop_tree
    for n in (1, 2, 3):
        for parts in itertools.product(COMPONENTS, repeat=n):
            for flags in FLAGS:
                check_agreement(root, dirfd, "/".join(parts), flags)
