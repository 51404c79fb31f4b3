"""Every limit and knob of imgserver, in one validated, immutable object.

A :class:`Settings` is built once (by the command line or a test) and shared
read-only by all parts of the server, so no limit is a magic number hidden in
a module.  Validation happens in ``__post_init__`` and raises ``ValueError``
naming the setting, before any socket is opened.  Nothing here touches the
file system: whether ``root`` exists is for the I/O layer to find out.

Each field's ``metadata["help"]`` is a one-line description a command-line
parser can reuse.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

from .params import parse_presets

__all__ = ["Settings", "parse_servers", "SAMPLES_DIR", "MIN_SECRET_BYTES", "MAX_DIMENSION_LIMIT"]

#: Built-in sample images, served when no ``root`` is configured.
SAMPLES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "samples")

#: Shortest accepted signing secret: shorter HMAC keys are guessable.
MIN_SECRET_BYTES = 16

#: JPEG stores dimensions in 16 bits; no output can be larger than this.
MAX_DIMENSION_LIMIT = 65500


def _machine_memory_mb() -> float:
    """Physical memory in MiB (None-safe: 4 GiB where it cannot be read)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1024 * 1024)
    except (ValueError, OSError, AttributeError):
        return 4096.0


def default_max_memory_mb() -> float:
    """A quarter of the machine's memory, between 256 MiB and 4 GiB."""
    return float(max(256, min(4096, int(_machine_memory_mb() // 4))))


def _help(text: str) -> dict[str, str]:
    return {"help": text}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_servers(value: str | None) -> tuple[tuple[str, int], ...]:
    """``"HOST:PORT[,HOST:PORT...]"`` -> ((host, port), ...); ``[v6]:port`` accepted.

    Raises ``ValueError`` naming the bad entry.  Duplicates are refused: they
    would skew the consistent hashing.
    """
    if value is None:
        return ()
    if not isinstance(value, str) or not value.strip():
        raise ValueError("memcached must be HOST:PORT[,HOST:PORT...]")
    servers: list[tuple[str, int]] = []
    for entry in value.split(","):
        entry = entry.strip()
        host, sep, port = entry.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or any(
                c.isspace() or c in "/[]" for c in host):
            raise ValueError(f"memcached: {entry!r} is not HOST:PORT")
        if (host, int(port)) in servers:
            raise ValueError(f"memcached: {entry!r} is listed twice")
        servers.append((host, int(port)))
    return tuple(servers)


@dataclass(frozen=True)
class Settings:
    """Configuration of one imgserver; see each field's ``metadata["help"]``."""

    root: str | None = field(
        default=None,
        metadata=_help("Directory whose images are served; None serves the built-in samples."),
    )
    workers: int = field(
        default_factory=lambda: os.cpu_count() or 1,
        metadata=_help("Images processed at once (worker threads); default: the number of CPUs."),
    )
    max_queue: int = field(
        default=100,
        metadata=_help("Requests allowed to wait for a worker; beyond it the server answers 503."),
    )
    cache_mb: float = field(
        default=64,
        metadata=_help(
            "Size of the in-memory cache of transformed images, in MiB; 0 disables it."
        ),
    )
    secret: bytes | None = field(
        default=None,
        repr=False,
        metadata=_help(
            "HMAC-SHA256 key for signed URLs (at least 16 bytes); None accepts unsigned URLs."
        ),
    )
    max_pixels: int = field(
        default=50_000_000,
        metadata=_help(
            "Largest source image, in pixels, read from the header before decoding "
            "(imgproxy's default is 50 MP)."
        ),
    )
    max_file_mb: float = field(
        default=50,
        metadata=_help("Largest source file, in MiB."),
    )
    timeout: float = field(
        default=30.0,
        metadata=_help("Seconds a request may take before the server answers 504."),
    )
    max_dimension: int = field(
        default=8192,
        metadata=_help("Largest accepted w and h query parameter, in pixels."),
    )
    default_quality: int = field(
        default=85,
        metadata=_help("JPEG and WebP quality (1-100) when the request gives no q."),
    )
    secret_file: str | None = field(
        default=None,
        metadata=_help(
            "File holding the signing key (first line); keeps it out of the process list. "
            "The environment variable IMGSERVER_SECRET is read when neither is given."
        ),
    )
    max_memory_mb: float = field(
        default_factory=default_max_memory_mb,
        metadata=_help(
            "Memory budget of images in processing, in MiB, estimated from each image's header "
            "(decoded source + output); work beyond it waits or is refused with 503. "
            "Default: a quarter of the machine's memory, 256-4096."
        ),
    )
    max_output_pixels: int = field(
        default=25_000_000,
        metadata=_help("Largest output image, in pixels (w x h after dpr and fit)."),
    )
    cache_control: str = field(
        default="public, max-age=86400",
        metadata=_help("Cache-Control of successful image answers (originals and transforms)."),
    )
    max_connections: int = field(
        default=1024,
        metadata=_help("HTTP connections open at once; beyond it a new one gets 503 (Retry-After: 1) and is "
            "closed. PB connections are capped by the same number, counted separately."),
    )
    header_timeout: float = field(
        default=10.0,
        metadata=_help("Seconds a client may take to send a request's line and headers (PB: to log in)."),
    )
    idle_timeout: float = field(
        default=60.0,
        metadata=_help("Seconds an idle keep-alive connection is kept open."),
    )
    send_timeout: float = field(
        default=30.0,
        metadata=_help(
            "Seconds a response may go without the client accepting any of its bytes; "
            "then the connection is dropped and its file closed (PB: a client whose unread "
            "answers stay over 64 KiB this long)."
        ),
    )
    max_streams: int = field(
        default=32,
        metadata=_help(
            "Originals streamed at once (their own lane, apart from transforms); beyond it 503."
        ),
    )
    max_frames: int = field(
        default=100,
        metadata=_help(
            "Frames of an animated image that may be decoded for one answer (frame=, animated=); "
            "decoded frames x pixels also count against max_pixels."
        ),
    )
    presets: tuple[str, ...] = field(
        default=(),
        metadata=_help(
            "Named parameter sets, NAME:QUERY (e.g. thumb:w=200&h=200&fit=crop), used as "
            "?preset=NAME; explicit parameters override the preset's. Repeatable."
        ),
    )

    result_dir: str | None = field(
        default=None,
        metadata=_help(
            "Directory of the on-disk result store (transformed images kept across restarts, shared by "
            "the processes of one machine); None: no store."
        ),
    )
    result_dir_max_mb: float = field(
        default=1024,
        metadata=_help("Size the result store is kept under, in MiB (least recently used entries go first)."),
    )
    memcached: str | None = field(
        default=None,
        metadata=_help(
            "memcached servers HOST:PORT[,HOST:PORT...] sharing results between machines (consistent "
            "hashing); None: no memcached tier."
        ),
    )
    memcached_timeout: float = field(
        default=0.05,
        metadata=_help(
            "Seconds a request waits for memcached before it processes the image itself (a slow or dead "
            "memcached never fails a request)."
        ),
    )
    memcached_max_item_kb: int = field(
        default=1024,
        metadata=_help("memcached's item size limit (its -I), in KiB: larger results are not stored there."),
    )

    def __post_init__(self) -> None:
        if self.root is not None:
            root = os.fspath(self.root)
            if not isinstance(root, str) or not root:
                raise ValueError("root must be a non-empty directory path or None")
            if "\0" in root:
                raise ValueError("root must not contain NUL characters")
            object.__setattr__(self, "root", root)

        if self.secret is not None:
            secret = self.secret
            if isinstance(secret, str):
                secret = secret.encode("utf-8")
            if not isinstance(secret, (bytes, bytearray)):
                raise ValueError("secret must be bytes, str or None")
            if len(secret) < MIN_SECRET_BYTES:
                raise ValueError(
                    f"secret must be at least {MIN_SECRET_BYTES} bytes long "
                    "(e.g. python -c 'import secrets; print(secrets.token_hex(32))')"
                )
            object.__setattr__(self, "secret", bytes(secret))

        if self.secret is None:
            key = None
            if self.secret_file is not None:
                try:
                    with open(self.secret_file, "rb") as f:
                        key = f.readline().strip()
                except OSError as e:
                    raise ValueError(f"secret_file: cannot read it ({e.strerror})") from None
            elif os.environ.get("IMGSERVER_SECRET"):
                key = os.environ["IMGSERVER_SECRET"].encode("utf-8")
            if key is not None:
                if len(key) < MIN_SECRET_BYTES:
                    raise ValueError(f"the secret must be at least {MIN_SECRET_BYTES} bytes long")
                object.__setattr__(self, "secret", bytes(key))

        self._check_int("workers", minimum=1)
        self._check_number("max_memory_mb", minimum=16, allow_zero=True)
        self._check_int("max_output_pixels", minimum=1)
        self._check_int("max_connections", minimum=1)
        self._check_number("header_timeout", minimum=0, allow_zero=False)
        self._check_number("idle_timeout", minimum=0, allow_zero=False)
        self._check_number("send_timeout", minimum=0, allow_zero=False)
        self._check_int("max_streams", minimum=1)
        if not isinstance(self.cache_control, str) or any(c in self.cache_control for c in "\r\n\0"):
            raise ValueError("cache_control must be a header value (no CR, LF or NUL)")
        self._check_int("max_queue", minimum=0)
        self._check_number("cache_mb", minimum=0, allow_zero=True)
        self._check_int("max_pixels", minimum=1)
        self._check_number("max_file_mb", minimum=0, allow_zero=False)
        self._check_number("timeout", minimum=0, allow_zero=False)
        self._check_int("max_dimension", minimum=1, maximum=MAX_DIMENSION_LIMIT)
        self._check_int("default_quality", minimum=1, maximum=100)
        self._check_int("max_frames", minimum=1)
        if self.result_dir is not None:
            result_dir = os.fspath(self.result_dir)
            if not isinstance(result_dir, str) or not result_dir or "\0" in result_dir:
                raise ValueError("result_dir must be a non-empty directory path (no NUL) or None")
            object.__setattr__(self, "result_dir", result_dir)
        self._check_number("result_dir_max_mb", minimum=0, allow_zero=False)
        object.__setattr__(self, "_memcached_servers", parse_servers(self.memcached))
        self._check_number("memcached_timeout", minimum=0, allow_zero=False)
        self._check_int("memcached_max_item_kb", minimum=1)
        presets = () if self.presets is None else self.presets
        if isinstance(presets, str) or not all(isinstance(p, str) for p in presets):
            raise ValueError("presets must be a sequence of NAME:QUERY strings")
        object.__setattr__(self, "presets", tuple(presets))
        # Parsed once here (a bad preset stops the server before it listens).
        object.__setattr__(self, "_preset_params",
                           parse_presets(self.presets, max_dimension=self.max_dimension))

    def _check_int(self, name: str, minimum: int, maximum: int | None = None) -> None:
        value = getattr(self, name)
        if not _is_int(value):
            raise ValueError(f"{name} must be an integer, not {value!r}")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise ValueError(f"{name} must be {bound}, not {value}")

    def _check_number(self, name: str, minimum: float, allow_zero: bool) -> None:
        value = getattr(self, name)
        if not _is_number(value) or value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{name} must be a finite number, not {value!r}")
        if value < minimum or (value == minimum and not allow_zero):
            op = ">=" if allow_zero else ">"
            raise ValueError(f"{name} must be {op} {minimum}, not {value}")

    @property
    def image_root(self) -> str:
        """The directory actually served: ``root``, or the built-in samples."""
        return self.root if self.root is not None else SAMPLES_DIR

    @property
    def cache_bytes(self) -> int:
        """``cache_mb`` in bytes (what :class:`imgserver.cache.ResultCache` takes)."""
        return int(self.cache_mb * 1024 * 1024)

    @property
    def max_file_bytes(self) -> int:
        """``max_file_mb`` in bytes."""
        return int(self.max_file_mb * 1024 * 1024)

    @property
    def max_memory_bytes(self) -> int:
        """``max_memory_mb`` in bytes."""
        return int(self.max_memory_mb * 1024 * 1024)

    @property
    def preset_params(self) -> dict[str, dict[str, str]]:
        """Preset name -> its parameters (what ``parse_transform(presets=...)`` takes)."""
        return self._preset_params  # type: ignore[attr-defined, no-any-return]

    @property
    def result_dir_max_bytes(self) -> int:
        """``result_dir_max_mb`` in bytes."""
        return int(self.result_dir_max_mb * 1024 * 1024)

    @property
    def memcached_servers(self) -> tuple[tuple[str, int], ...]:
        """``memcached`` parsed: ((host, port), ...), empty without memcached."""
        return self._memcached_servers  # type: ignore[attr-defined, no-any-return]

    @property
    def signed(self) -> bool:
        """Whether requests must carry a valid signature."""
        return self.secret is not None

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> one-line description, e.g. for ``--help`` output."""
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}
