"""Open paths beneath a root directory, with the kernel enforcing the confinement.

Why: a server that maps request paths onto a directory must never open
anything outside it, whatever the path says (``..``, absolute paths) and
whatever the tree contains (symlinks pointing out, ``/proc`` magic links).
Checking the string and then calling ``open`` is racy and misses symlinks;
``openat2(RESOLVE_BENEATH)`` (Linux 5.6+) makes the kernel refuse every escape
during the lookup itself.

Two methods, one behaviour for callers:

* ``"openat2"``: one ``openat2(dirfd, path, {flags, mode, RESOLVE_BENEATH |
  RESOLVE_NO_MAGICLINKS [| RESOLVE_NO_SYMLINKS]})``. Symlinks are followed as
  long as every step stays beneath the root (unless ``no_symlinks``).
* ``"walk"`` (fallback where openat2 is missing or blocked by seccomp): one
  ``openat(O_NOFOLLOW)`` per component, each relative to the previous
  directory's descriptor. It refuses *every* symlink, inside or out: a strict
  subset of what ``openat2`` allows (exactly ``openat2`` with ``no_symlinks``).

Both methods first apply ``check_relative``, which refuses any ``..``
component outright, even one that stays inside (``a/../b``): ``openat2`` would
resolve it physically (after a symlink, ``..`` is the target's parent, not the
lexical one), the walk could not check it without tracking its own ancestry,
and request paths have no business containing one.

Everything here is blocking and reactor-free: call it in a worker thread, or
inline when the file system is known to be fast.

Errors: an escape raises ``OutsideRoot`` (a ``PermissionError``) whose
``errno`` is ``EXDEV`` (``..``, absolute path, symlink leading out) or
``ELOOP`` (a refused symlink or magic link); every other error keeps its usual
type (``FileNotFoundError``, ``NotADirectoryError``, ...). ``filename`` is
always the relative path asked for, never the root's absolute path, so the
error can be logged or shown without revealing the server's layout.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import sys
import threading
from typing import Any, Union

__all__ = [
    "RESOLVE_NO_XDEV",
    "RESOLVE_NO_MAGICLINKS",
    "RESOLVE_NO_SYMLINKS",
    "RESOLVE_BENEATH",
    "RESOLVE_IN_ROOT",
    "OutsideRoot",
    "check_relative",
    "confinement_method",
    "escape_error",
    "open_beneath",
    "open_root",
    "openat2",
    "openat2_unavailable_reason",
    "resolve_flags",
]

# include/uapi/linux/openat2.h
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

_O_PATH = getattr(os, "O_PATH", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_CREAT = os.O_CREAT
_O_TMPFILE = getattr(os, "O_TMPFILE", 0)
_DIR_FLAGS = _O_PATH | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC
_AT_FDCWD = -100
_U64 = 0xFFFFFFFFFFFFFFFF
# openat2 answers EAGAIN when it cannot prove a ".." stayed beneath the root
# (a concurrent rename or mount); the man page says to retry.
_EAGAIN_RETRIES = 8

# Since Linux 5.1 every architecture numbers new syscalls alike (openat2 is
# 437) except alpha, ia64 and mips; only these machines are allowed, so a
# wrong guess never calls some other syscall with our arguments.
_OPENAT2_NR = {
    "x86_64": 437, "aarch64": 437, "i386": 437, "i686": 437,
    "armv7l": 437, "armv6l": 437, "ppc64le": 437, "ppc64": 437,
    "s390x": 437, "riscv64": 437, "loongarch64": 437,
}

PathArg = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]


class OutsideRoot(PermissionError):
    """The path leads outside its root: '..' above it, absolute, a symlink
    outside, a magic link, or (with no_symlinks / the walk) any symlink.

    ``errno`` is EXDEV for an escape (what openat2's RESOLVE_BENEATH gives)
    and ELOOP for a refused symlink or magic link; ``filename`` is the
    relative path asked for.
    """


class _OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


assert ctypes.sizeof(_OpenHow) == 24

_MACHINE = os.uname().machine if hasattr(os, "uname") else ""
_NR = _OPENAT2_NR.get(_MACHINE) if sys.platform.startswith("linux") else None
_syscall: Any = None
if _NR is not None:
    _syscall = ctypes.CDLL(None, use_errno=True).syscall
    _syscall.restype = ctypes.c_long
    _syscall.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_char_p,
                         ctypes.c_void_p, ctypes.c_size_t]


def _fs_path(path: PathArg) -> str:
    """The path as ``str`` (undecodable bytes survive as surrogates)."""
    return os.fsdecode(os.fspath(path))


def _outside(err: int, path: str) -> OutsideRoot:
    if err == errno.ELOOP:
        msg = "Symlink or magic link refused beneath the root"
    else:
        msg = "Path leads outside the root"
    return OutsideRoot(err, msg, path)


# --- the raw syscall and its probe ------------------------------------------------


def openat2(dirfd: int, path: PathArg, flags: int, mode: int = 0,
            resolve: int = 0) -> int:
    """openat2(2) via ctypes; returns the new descriptor.

    Like ``os.open`` it adds O_CLOEXEC (PEP 446) and retries EINTR (PEP 475).
    The kernel is strict where open(2) is lax: unknown flags, or a ``mode``
    without O_CREAT/O_TMPFILE, give EINVAL. Errors raise the matching OSError
    subclass with ``filename`` = ``path`` as given.
    """
    if _syscall is None:
        raise OSError(errno.ENOSYS, "openat2 is not available on "
                      f"{sys.platform}/{_MACHINE}", path)
    raw = os.fsencode(path)
    if 0 in raw:
        raise ValueError("embedded null byte")
    how = _OpenHow((flags | _O_CLOEXEC) & _U64, mode & _U64, resolve & _U64)
    while True:
        fd: int = _syscall(_NR, dirfd, raw, ctypes.addressof(how),
                      ctypes.sizeof(how))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, os.strerror(err), path)


_PROBE_REASONS: dict[int | None, str] = {
    errno.ENOSYS: "ENOSYS: kernel older than 5.6 (or a seccomp filter "
                  "answering ENOSYS)",
    errno.EPERM: "EPERM: blocked by seccomp (or another security policy)",
    errno.EACCES: "EACCES: blocked by a security module",
}

_UNSET: Any = object()
_reason: Any = _UNSET  # the cached probe answer: None or a reason string
_probe_lock = threading.Lock()


def _probe() -> str | None:
    """Try openat2 for real: "." beneath "/" must open, ".." must give EXDEV.

    The second call proves RESOLVE_BENEATH is enforced, not just accepted.
    """
    if not sys.platform.startswith("linux"):
        return f"not Linux (platform {sys.platform})"
    if _NR is None:
        return f"openat2 syscall number not known for machine {_MACHINE!r}"
    try:
        root = os.open("/", _O_PATH | _O_DIRECTORY | _O_CLOEXEC)
    except OSError as e:
        return f"cannot open / for the probe: {e}"
    try:
        beneath = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS
        try:
            os.close(openat2(root, ".", _O_PATH | _O_DIRECTORY, 0, beneath))
        except OSError as e:
            return _PROBE_REASONS.get(e.errno) or (
                f"openat2 probe failed: {errno.errorcode.get(e.errno, e.errno)}"  # type: ignore[arg-type]
                f": {e.strerror}")
        try:
            os.close(openat2(root, "..", _O_PATH | _O_DIRECTORY, 0, beneath))
        except OSError as e:
            if e.errno == errno.EXDEV:
                return None
            return f"openat2 probe: '..' gave {e!r}, not EXDEV"
        return "openat2 ignored RESOLVE_BENEATH ('..' opened)"
    finally:
        os.close(root)


def openat2_unavailable_reason() -> str | None:
    """None if openat2 works in this process, else why; probed once, cached.

    A call-time ENOSYS, or an EPERM that a fresh probe confirms, updates the
    cached answer (a seccomp filter can be installed after the first probe).
    """
    global _reason
    reason: str | None = _reason
    if reason is _UNSET:
        with _probe_lock:
            if _reason is _UNSET:
                _reason = _probe()
            reason = _reason
    return reason


def _mark_unavailable(reason: str) -> None:
    global _reason
    with _probe_lock:
        _reason = reason


def _blocked_now() -> str | None:
    """After an EPERM from openat2: a reason if the syscall itself is refused
    (seccomp), None if the EPERM was about the file (a real permission error).
    """
    try:
        fd = openat2(_AT_FDCWD, "/", _O_PATH | _O_DIRECTORY)
    except OSError as e:
        if e.errno in (errno.EPERM, errno.ENOSYS):
            return _PROBE_REASONS[e.errno]
        return None
    os.close(fd)
    return None


def confinement_method() -> str:
    """What ``method="auto"`` uses here: "openat2" or "walk" (for stats)."""
    return "openat2" if openat2_unavailable_reason() is None else "walk"


# --- shared checks ----------------------------------------------------------------


def open_root(path: PathArg) -> int:
    """An O_PATH directory descriptor of the root (follows symlinks in ``path``:
    the root itself is configuration, trusted). NotADirectoryError etc. as usual.
    """
    return os.open(path, _O_PATH | _O_DIRECTORY | _O_CLOEXEC)


def resolve_flags(no_symlinks: bool = False) -> int:
    """RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS, plus RESOLVE_NO_SYMLINKS if asked.

    NO_MAGICLINKS is explicit because the man page says BENEATH's refusal of
    magic links "may change in the future".
    """
    flags = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS
    if no_symlinks:
        flags |= RESOLVE_NO_SYMLINKS
    return flags


def check_relative(path: PathArg) -> None:
    """Cheap name checks both methods share, done before touching the disk.

    "" gives FileNotFoundError (as ``os.open("")``); an embedded NUL gives
    ValueError (as ``os.open``); an absolute path or any ".." component gives
    OutsideRoot(EXDEV), even a ".." that would stay inside (see the module
    docstring for why).
    """
    path = _fs_path(path)
    if "\0" in path:
        raise ValueError("embedded null byte")
    if not path:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
    if path.startswith("/") or ".." in path.split("/"):
        raise _outside(errno.EXDEV, path)


def escape_error(err: OSError, path: PathArg, *,
                 resolve: int | None = None) -> OSError:
    """The error to raise for ``err`` from opening ``path`` beneath a root.

    EXDEV becomes OutsideRoot; so does ELOOP when ``resolve`` refuses symlinks
    or magic links (the default assumes ``resolve_flags()``, which always
    refuses magic links: then a symlink loop also reads as OutsideRoot(ELOOP),
    which is still a refusal). Other errors keep their type (ENOENT stays
    FileNotFoundError). ``filename`` becomes the relative ``path``.
    """
    path = _fs_path(path)
    if resolve is None:
        resolve = resolve_flags()
    code = err.errno
    if code is None:
        return err
    if code == errno.EXDEV or (
            code == errno.ELOOP
            and resolve & (RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)):
        return _outside(code, path)
    if isinstance(err, OutsideRoot):
        return OutsideRoot(code, err.strerror, path)
    return OSError(code, err.strerror or os.strerror(code), path)


# --- the two methods -------------------------------------------------------------


def _create_mode(flags: int, mode: int) -> int:
    """openat2 rejects a mode unless the open can create a file."""
    if flags & _O_CREAT or (_O_TMPFILE and flags & _O_TMPFILE == _O_TMPFILE):
        return mode
    return 0


def _open_openat2(dirfd: int, path: str, flags: int, mode: int,
                  no_symlinks: bool) -> int:
    resolve = resolve_flags(no_symlinks)
    mode = _create_mode(flags, mode)
    for _ in range(_EAGAIN_RETRIES):
        try:
            return openat2(dirfd, path, flags, mode, resolve)
        except OSError as e:
            if e.errno != errno.EAGAIN:
                raise
    return openat2(dirfd, path, flags, mode, resolve)


def _split(path: str) -> tuple[list[str], bool]:
    """Components without "." and empty ones, and whether the last must be a
    directory (a trailing "/" or "/.", as path resolution treats them)."""
    raw = path.split("/")
    parts = [p for p in raw if p and p != "."]
    must_be_dir = len(raw) > 1 and raw[-1] in ("", ".")
    return parts, must_be_dir


def _refused_symlink(err: OSError, name: str, dirfd: int) -> bool:
    """Did an O_NOFOLLOW open of ``name`` fail because it is a symlink?

    ELOOP always means that here (one component, nothing followed); ENOTDIR
    means it with O_DIRECTORY, or a real non-directory: lstat tells which.
    """
    if err.errno == errno.ELOOP:
        return True
    if err.errno != errno.ENOTDIR:
        return False
    try:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except OSError:
        return False
    return stat.S_ISLNK(st.st_mode)


_os_open = os.open  # module-level so tests can inject failures into the walk


def _open_component(name: str, flags: int, mode: int, dirfd: int,
                    path: str) -> int:
    try:
        return _os_open(name, flags, mode, dir_fd=dirfd)
    except OSError as e:
        if _refused_symlink(e, name, dirfd):
            raise _outside(errno.ELOOP, path) from None
        raise escape_error(e, path) from None


def _open_walk(dirfd: int, path: str, flags: int, mode: int) -> int:
    """One O_NOFOLLOW openat per component; refuses every symlink.

    Intermediate descriptors are closed on every exit, whatever is raised.
    """
    parts, must_be_dir = _split(path)
    last_flags = flags | _O_NOFOLLOW
    if must_be_dir:
        if flags & _O_CREAT:  # what the kernel says for "name/" with O_CREAT
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR),
                                    path)
        last_flags |= _O_DIRECTORY
    if not parts:  # "." or "./": the root itself
        return _open_component(".", last_flags, mode, dirfd, path)
    cur = dirfd
    try:
        for name in parts[:-1]:
            nxt = _open_component(name, _DIR_FLAGS, 0, cur, path)
            prev, cur = cur, nxt
            if prev != dirfd:
                os.close(prev)
        fd = _open_component(parts[-1], last_flags, mode, cur, path)
        if flags & _O_PATH:
            # O_PATH|O_NOFOLLOW opens a symlink itself instead of failing.
            try:
                is_link = stat.S_ISLNK(os.fstat(fd).st_mode)
            except BaseException:
                os.close(fd)
                raise
            if is_link:
                os.close(fd)
                raise _outside(errno.ELOOP, path)
        return fd
    finally:
        if cur != dirfd:
            os.close(cur)


_METHODS = ("auto", "openat2", "walk")


def open_beneath(dirfd: int, path: PathArg, flags: int, *,
                 no_symlinks: bool = False, method: str = "auto",
                 mode: int = 0o666) -> int:
    """Open ``path`` relative to the directory ``dirfd``, never outside it.

    ``method``: "openat2", "walk" or "auto" (openat2 when
    ``openat2_unavailable_reason()`` is None, else walk; also walk when
    openat2 gives ENOSYS, or an EPERM that a fresh probe shows is the syscall
    being blocked rather than the file being protected). ``no_symlinks``
    refuses every symlink under openat2; the walk always does. ``mode`` is
    used only with O_CREAT/O_TMPFILE. The descriptor is non-inheritable.

    Raises OutsideRoot for escapes (see the module docstring), ValueError for
    a NUL, and otherwise what open(2) gives, with ``filename`` = ``path``.
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, not {method!r}")
    path = _fs_path(path)
    check_relative(path)
    if method == "walk":
        return _open_walk(dirfd, path, flags, mode)
    if method == "auto" and openat2_unavailable_reason() is not None:
        return _open_walk(dirfd, path, flags, mode)
    try:
        return _open_openat2(dirfd, path, flags, mode, no_symlinks)
    except OSError as e:
        if method == "auto" and e.errno == errno.ENOSYS:
            _mark_unavailable(_PROBE_REASONS[errno.ENOSYS])
            return _open_walk(dirfd, path, flags, mode)
        if method == "auto" and e.errno == errno.EPERM:
            blocked = _blocked_now()
            if blocked is not None:
                _mark_unavailable(blocked)
                return _open_walk(dirfd, path, flags, mode)
        raise escape_error(e, path, resolve=resolve_flags(no_symlinks)) from None
