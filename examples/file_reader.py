"""Read images with a FileReader on ``reactor.addReader``; decode them in threads, at most 2 at once.

What it shows
    * Part 1, by hand: ``engine.open(path)`` gives an ``OpenedFile`` (or an
      ``Op`` whose Deferred gives one, on a mount where opening is slow);
      ``FileReader(opened, engine, BufferSink(...), 0, reactor)`` wraps it;
      ``start()`` registers it with the reactor (``startReading`` =
      ``reactor.addReader``) and returns its Deferred, which fires with the
      file's bytes.  The reader never closes the descriptor: whoever opened
      it does (``engine.close``), once the reader is done.  Every chunk
      arrives in one ``doRead`` call (``start(inline_steps=0)``; the default
      reads up to two chunks at once in ``start()``, so a small cached file
      never waits for the reactor at all).
    * Part 2, the one-liner: ``FileLoader.load(path)``, which does all of the
      above (and, for a small cached file, reads it in the calling turn with
      no reader at all), with bounded open files and waiters.
    * In both, a callback on the read's Deferred decodes the image with
      Pillow in a dedicated ``ThreadPool`` (``deferToThreadPool``), through a
      ``Limiter(2)``: the pool has 4 threads, so it is the limiter that keeps
      decodes (and their memory) to 2 at a time.
    * Per image it prints the bytes read, the chunks (one per ``doRead``, the
      last being the read that returns 0 at end of file), in order, which
      were copied in ``doRead`` and which had to be read in the I/O pool,
      and the decoded format, size and mode; at the end the peak number of
      decodes in flight (measured inside the decode threads), the worst
      reactor stall (a 1 ms ``LoopingCall`` measuring its own lateness),
      apart for the intervals in which a decode ran, and the stats.  It
      exits 1 if more than 2 decodes ever ran at once, a decode ran in the
      reactor thread, a file came back short or a descriptor was left open.
    * Part 1 first evicts the files from the page cache
      (``posix_fadvise(DONTNEED)``), so you can see chunks that RWF_NOWAIT
      could not copy go to the pool (``--no-evict`` to skip that).

    Images: those in ``imgserver/samples/`` when it has any, otherwise a few
    generated with Pillow in a temporary directory (``--generate`` forces
    that, ``--images DIR`` picks another directory).

Why a FileReader on addReader is never "not ready"
    Readiness means nothing for a regular file.  ``epoll`` refuses to watch
    one (``EPERM``); Twisted's ``EPollReactor.addReader`` then falls back to
    ``_ContinuousPolling``, a ``LoopingCall`` that calls ``doRead`` of every
    such reader once per reactor iteration, busy-polling as long as one is
    registered (the asyncio reactor does the same).  ``select`` and ``poll``
    report a regular file readable at all times: at end of file, and just
    as much when its data is on a disk that will take 10 ms to answer.  So
    ``doRead`` is called whether or not a read would block, and a plain
    ``read()`` there would stall the whole reactor on a cold or slow file.
    (kqueue, on macOS and the BSDs, does watch files, but reports nothing at
    end of file: a reader waiting for EOF there may never be called again.)

How asyncfile copes
    * Each ``doRead`` reads one chunk with ``preadv(..., RWF_NOWAIT)``: the
      kernel copies it from the page cache, or fails at once with EAGAIN
      instead of waiting for storage.
    * On EAGAIN the reader stops reading (removes itself from the reactor,
      which also ends the busy polling) and that chunk is read by the I/O
      pool; when it is done the reader registers again.  File systems that
      refuse RWF_NOWAIT (FUSE, NFS: EOPNOTSUPP) are read in the pool from
      then on; tmpfs is read inline without the flag.
    * One chunk per ``doRead`` bounds the time of each reactor iteration
      (a page-cache copy of 256 KiB takes about 25 µs) and lets other work
      run between chunks.  End of file is a read that returns 0, never the
      ``fstat`` size (files grow and shrink, /proc files claim size 0).
    * With the files evicted first, the trail shows the kernel's readahead:
      one chunk goes to the pool, and the read it makes brings the next
      chunks into the page cache, so they are copied in ``doRead`` again.

When to choose it
    ``FileLoader.load`` (or ``read_file``) is what to use: it adds limits,
    queueing, cancellation and the fast path for small cached files.  Build a
    ``FileReader`` by hand only for something the loader does not do: your
    own sink (a hash, a parser fed chunk by chunk), or a file you opened
    yourself.  Decode in threads in any case: a decode takes milliseconds
    to tens of milliseconds, and Pillow releases the GIL while its C
    decoders run.  Not for all of a decode, though: the code around them
    holds it, and the reactor thread then waits for it, up to the 5 ms
    switch interval and more.  Compare the two stall figures: reading stays
    near 1 ms, decoding in threads does not; a low limit on decodes in
    flight keeps that cost (and the decoded images' memory) bounded.

Run it:

    python examples/file_reader.py [--images DIR | --generate] [--limit 2]
        [--decode-threads 4] [--chunk-kib 16] [--no-evict]
"""

from __future__ import annotations

import argparse
import errno
import io
import os
import select
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from twisted.internet import defer, task
from twisted.internet.threads import deferToThreadPool
from twisted.python import threadable
from twisted.python.threadpool import ThreadPool

from asyncfile import FileLoader, FileReader, Limiter
from asyncfile.engines import IOPool, Op, make_engine
from asyncfile.reader import BufferSink

SAMPLES = Path(__file__).resolve().parent.parent / "imgserver" / "samples"
KIB = 1024


# --- which images --------------------------------------------------------------


def images_in(directory: Path) -> list[Path]:
    """Files in ``directory`` whose extension Pillow knows how to open."""
    if not directory.is_dir():
        return []
    known = Image.registered_extensions()
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in known)


def generate_images(directory: Path) -> list[Path]:
    """A few images of different formats and sizes, drawn with Pillow."""
    noise = Image.effect_noise((1600, 1067), 48)
    gradient = Image.linear_gradient("L").resize((1600, 1067))
    photo = Image.merge("RGB", (gradient, noise, gradient.transpose(Image.Transpose.ROTATE_180)))
    logo = Image.new("RGBA", (512, 512), (0, 0, 0, 0))
    logo.paste((200, 40, 40, 255), (96, 96, 416, 416), Image.radial_gradient("L").resize((320, 320)))
    made = [
        ("photo.jpg", photo, {"quality": 85}),
        ("logo.png", logo, {}),
        ("landscape.webp", photo.resize((1200, 800)), {"quality": 80}),
        ("gray.png", noise.resize((640, 480)), {}),
    ]
    paths = []
    for name, image, options in made:
        path = directory / name
        image.save(path, **options)
        paths.append(path)
    return paths


def evict(paths: list[Path]) -> int:
    """Drop the files' pages from the page cache; returns how many files."""
    done = 0
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages (a file just written) cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            done += 1
        except OSError:
            pass  # a file system without fadvise: the reads are just cached
        finally:
            os.close(fd)
    return done


def readiness_of_a_regular_file(path: Path) -> None:
    """What epoll, select and poll say about a regular file, even at its end."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.lseek(fd, 0, os.SEEK_END)  # at end of file: nothing left to read
        ep = getattr(select, "epoll", None)
        if ep is not None:
            with ep() as e:
                try:
                    e.register(fd, select.EPOLLIN)
                    said = "accepted (unexpected on Linux)"
                except OSError as exc:
                    said = f"refused with {errno.errorcode.get(exc.errno, exc.errno)}"
            print(f"  epoll.register(fd): {said}; Twisted then polls it in every reactor iteration")
        readable, _, _ = select.select([fd], [], [], 0)
        print(f"  select(), at end of file: {'readable' if readable else 'not readable'}")
        if hasattr(select, "poll"):
            p = select.poll()
            p.register(fd, select.POLLIN)
            events = p.poll(0)
            ready = bool(events and events[0][1] & select.POLLIN)
            print(f"  poll(), at end of file: {'POLLIN' if ready else 'no event'}")
    finally:
        os.close(fd)


# --- the reader, counting how its chunks arrived --------------------------------


class CountingReader(FileReader):
    """A ``FileReader`` that notes how each chunk was read, in order."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.trail: list[str] = []  # per doRead: "doRead" (read it) or "pool" (EAGAIN)
        self.registered = False  # seen in reactor.getReaders() during a doRead

    def doRead(self) -> None:
        if not self.registered:
            self.registered = self in self.reactor.getReaders()
        before = self.chunks
        super().doRead()
        # No chunk: RWF_NOWAIT said EAGAIN, the reader left the reactor and
        # the I/O pool reads this chunk.
        self.trail.append("doRead" if self.chunks > before else "pool")

    def how(self) -> str:
        """The trail, run-length encoded: "pool x1, doRead x3"."""
        runs: list[list] = []
        for step in self.trail:
            if runs and runs[-1][0] == step:
                runs[-1][1] += 1
            else:
                runs.append([step, 1])
        rest = self.chunks - len(self.trail)  # a file that is never read inline
        if rest:
            runs.append(["pool, not inline-readable", rest])
        return ", ".join(f"{step} x{n}" for step, n in runs)


# --- decoding -------------------------------------------------------------------


@dataclass
class Decoded:
    nbytes: int  # of the encoded image
    format: str
    size: tuple[int, int]
    mode: str
    seconds: float


class Decoder:
    """Decodes in a dedicated thread pool, at most ``limit`` at once."""

    def __init__(self, reactor, limit: int, threads: int) -> None:
        self.reactor = reactor
        self.limiter = Limiter(limit, max_waiting=None)
        self.pool = ThreadPool(minthreads=threads, maxthreads=threads, name="decode")
        self.pool.start()  # all threads now: starting one later stalls the reactor
        self._lock = threading.Lock()
        self.in_flight = 0
        self.peak = 0
        self.started = 0
        self.finished = 0
        self.in_reactor_thread = 0

    def _decode(self, data: bytes) -> Decoded:  # runs in a pool thread
        with self._lock:
            self.in_reactor_thread += threadable.isInIOThread()
            self.started += 1
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        try:
            started = time.perf_counter()
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                return Decoded(len(data), im.format, im.size, im.mode, time.perf_counter() - started)
        finally:
            with self._lock:
                self.in_flight -= 1
                self.finished += 1

    def decode(self, data: bytes) -> defer.Deferred[Decoded]:
        """The callback to put on a read's Deferred."""
        return self.limiter.run(deferToThreadPool, self.reactor, self.pool, self._decode, data)

    def stop(self) -> None:
        self.pool.stop()


# --- the two ways of reading ----------------------------------------------------


class Tally:
    def __init__(self) -> None:
        self.open_fds = 0
        self.failures: list[str] = []
        self.registered = 0  # readers found in reactor.getReaders() by their doRead


async def read_by_hand(reactor, engine, path: Path, chunk_size: int, tally: Tally,
                       decoder: Decoder) -> str:
    """engine.open -> FileReader(...).start() on addReader -> decode."""
    got = engine.open(str(path))  # an OpenedFile, or an Op running off the reactor thread
    opened = await got.deferred if isinstance(got, Op) else got
    tally.open_fds += 1

    async def close() -> None:  # the descriptor is ours: the reader never closes it
        closing = engine.close(opened)
        if closing is not None:
            await closing.deferred
        tally.open_fds -= 1

    sink = BufferSink(opened.size, None, chunk_size)  # one buffer of the fstat size
    reader = CountingReader(opened, engine, sink, 0, reactor)
    # inline_steps=0: every chunk, even the first, waits for a doRead.
    try:
        data = await reader.start(inline_steps=0)
    finally:
        await close()
    decoded = await decoder.decode(data)

    size = path.stat().st_size
    if decoded.nbytes != size:
        tally.failures.append(f"{path.name}: read {decoded.nbytes} of {size} bytes")
    tally.registered += reader.registered
    return (
        f"{path.name:<20} {decoded.nbytes:>7} B  {reader.chunks:>2} chunks ({reader.chunks - 1} data "
        f"+ EOF): {reader.how():<22} -> {decoded.format} {decoded.size[0]}x{decoded.size[1]} "
        f"{decoded.mode} in {decoded.seconds * 1000:.1f} ms"
    )


async def load_with_loader(loader: FileLoader, path: Path, tally: Tally,
                           decoder: Decoder) -> str:
    """The one-liner: FileLoader.load(path), the decode as its callback."""
    decoded = await loader.load(path).addCallback(decoder.decode)
    size = path.stat().st_size
    if decoded.nbytes != size:
        tally.failures.append(f"{path.name}: loaded {decoded.nbytes} of {size} bytes")
    return (
        f"{path.name:<20} {decoded.nbytes:>7} B  -> {decoded.format} "
        f"{decoded.size[0]}x{decoded.size[1]} {decoded.mode} in {decoded.seconds * 1000:.1f} ms"
    )


# --- the program ----------------------------------------------------------------


class StallProbe:
    """A 1 ms ``LoopingCall`` that records how late each call was, apart for
    the intervals in which a decode ran (one was running at either end, or
    one started or finished in between)."""

    def __init__(self, reactor, decoder: "Decoder", interval: float = 0.001) -> None:
        self.interval = interval
        self.decoder = decoder
        self.worst = {False: 0.0, True: 0.0}  # by "a decode ran meanwhile"
        self._last = 0.0
        self._seen = (0, 0)
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = reactor

    def _tick(self) -> None:
        now = time.perf_counter()
        seen = (self.decoder.started, self.decoder.finished)
        decoding = seen != self._seen or seen[0] != seen[1]
        if self._last:
            late = now - self._last - self.interval
            self.worst[decoding] = max(self.worst[decoding], late)
        self._last, self._seen = now, seen

    def start(self) -> None:
        self._loop.start(self.interval)

    def stop(self) -> None:
        self._loop.stop()
        self._tick()  # the last interval counts too, even if nothing ran in it


async def main(reactor, args: argparse.Namespace) -> None:
    tmp: Path | None = None
    if args.images is not None:
        paths = images_in(args.images)
        where = f"{len(paths)} images from {args.images}"
    elif not args.generate and images_in(SAMPLES):
        paths = images_in(SAMPLES)
        where = f"{len(paths)} built-in sample images from imgserver/samples/"
    else:
        tmp = Path(tempfile.mkdtemp(prefix="file-reader-"))
        paths = generate_images(tmp)
        why = "--generate" if args.generate else "imgserver/samples/ has no images"
        where = f"{len(paths)} images generated with Pillow in a temp dir ({why})"
    if not paths:
        print(f"no images in {args.images}")
        raise SystemExit(1)
    chunk_size = args.chunk_kib * KIB
    print(f"images: {where}")
    print(f"reactor: {type(reactor).__name__}; what it is told about a regular file:")
    readiness_of_a_regular_file(paths[0])

    decoder = Decoder(reactor, args.limit, args.decode_threads)
    engine = make_engine("nowait", reactor, IOPool(reactor, 4, name="by-hand-io"))
    loader = FileLoader(reactor, chunk_size=chunk_size, engine="nowait")  # the engine described above
    tally = Tally()
    evicted = evict(paths) if args.evict else 0  # fsync blocks: before measuring
    probe = StallProbe(reactor, decoder)
    probe.start()
    started = time.perf_counter()
    try:
        print(
            f"\n== part 1: by hand, engine.open -> FileReader(...).start(inline_steps=0), "
            f"engine {engine.name}, {args.chunk_kib} KiB chunks =="
        )
        print(
            f"page cache: {evicted} of {len(paths)} files evicted first"
            if args.evict else "page cache: not evicted (--no-evict)"
        )
        print(
            "each doRead reads one chunk with RWF_NOWAIT (\"doRead\"), or gets EAGAIN and the "
            "chunk is read\nin the I/O pool while the reader is off the reactor (\"pool\"); "
            "the last chunk is the read returning 0"
        )
        lines = await defer.gatherResults([
            defer.Deferred.fromCoroutine(
                read_by_hand(reactor, engine, p, chunk_size, tally, decoder)
            ) for p in paths
        ])
        print("\n".join(lines))
        st = engine.stats()
        print(
            f"engine: reads {st['inline_reads']} inline / {st['pool_reads']} in the pool, "
            f"{st.get('nowait_fallbacks', 0)} EAGAIN fallbacks; readers found in "
            f"reactor.getReaders() by their doRead: {tally.registered} of {len(paths)}"
        )

        print(
            f"\n== part 2: the one-liner, FileLoader(chunk_size={args.chunk_kib} KiB)"
            f".load(path).addCallback(decode) =="
        )
        print(
            f"cached files up to {args.chunk_kib} KiB are read in the calling reactor turn with "
            f"no FileReader;\nlarger ones by a FileReader as in part 1 (first two chunks "
            f"at once in start())"
        )
        lines = await defer.gatherResults([
            defer.Deferred.fromCoroutine(load_with_loader(loader, p, tally, decoder))
            for p in paths
        ])
        print("\n".join(lines))
        st = loader.stats()
        print(
            f"loader: {st['loaded']} loaded, {st['errors']} errors; reads {st['inline_reads']} "
            f"inline / {st['pool_reads']} in the pool; peak open {st['peak_open']} "
            f"(max_open {st['max_open']})"
        )
    finally:
        probe.stop()
        seconds = time.perf_counter() - started
        await loader.close()
        await engine.stop()
        decoder.stop()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    print()
    lim = decoder.limiter.stats()
    ok = decoder.peak <= args.limit
    print(
        f"decodes: {lim['started']} run, peak in flight {decoder.peak} (limit {args.limit}, "
        f"{args.decode_threads} pool threads) " + ("OK" if ok else "VIOLATED")
    )
    print(
        f"limiter: peak active {lim['peak_active']}, peak waiting {lim['peak_waiting']}; "
        f"decodes run in the reactor thread: {decoder.in_reactor_thread}"
    )
    print(f"descriptors still open: {tally.open_fds}")
    quiet, decoding = probe.worst[False], probe.worst[True]
    print(
        f"reactor stall: worst {max(quiet, decoding) * 1000:.2f} ms over {seconds:.2f} s "
        f"(1 ms LoopingCall probe): {quiet * 1000:.2f} ms while no decode ran, "
        f"{decoding * 1000:.2f} ms while one did"
    )
    for line in tally.failures:
        print(f"MISMATCH: {line}")
    if not ok or decoder.in_reactor_thread or tally.open_fds or tally.failures:
        print("FAILED: see the lines above")
        raise SystemExit(1)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = p.add_mutually_exclusive_group()
    source.add_argument("--images", type=Path, help="read the images in this directory")
    source.add_argument("--generate", action="store_true",
                        help="generate images even if imgserver/samples/ has some")
    p.add_argument("--limit", type=int, default=2, help="decodes in flight at most")
    p.add_argument("--decode-threads", type=int, default=4, help="threads in the decode pool")
    p.add_argument("--chunk-kib", type=int, default=16, help="bytes read per doRead, in KiB")
    p.add_argument("--no-evict", dest="evict", action="store_false",
                   help="do not evict the files from the page cache before part 1")
    args = p.parse_args(argv)
    if min(args.limit, args.decode_threads, args.chunk_kib) < 1:
        p.error("--limit, --decode-threads and --chunk-kib must be >= 1")
    return args


if __name__ == "__main__":
    task.react(main, (parse_args(sys.argv[1:]),))
