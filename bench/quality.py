"""Output quality next to throughput: which resize pipeline imgserver should use.

    python bench/quality.py CORPUS [--seconds 4] [--threads 2] [--repeat 2] [--limit 24]

For each workload (the server benchmark's 256x256 centre crop, a 640-wide
clip, and a 256x256 crop of the PNG/WebP images where JPEG draft does not
apply) and each candidate pipeline, two figures:

* **quality**: SSIM (luma, Gaussian window sigma 1.5, Wang et al. 2004;
  numpy) of the pipeline's resized image against a *reference*: the whole
  image decoded at full resolution and resized in one Lanczos pass with no
  ``reducing_gap``.  Measured before encoding, so it is the resampling
  alone; the JPEG q80 encoder's own loss (the reference encoded and decoded)
  is printed for scale.
* **cost**: images per CPU-second of the whole loop (decode from memory
  with ``draft``, convert, resize, encode JPEG q80 into a memfd) in
  ``--threads`` plain threads, best of ``--repeat`` interleaved runs; also
  images/s.  CPU time is what other processes on a shared machine disturb
  least, so the choice is made on it.

The pipeline imgserver uses must be acceptable on every workload; of those,
the one with the best geometric mean of images per CPU-second relative to
the former pipeline is chosen -- pipelines within ``NOISE`` (5%) of that
best count as as cheap, and of those the best mean SSIM wins.  A pipeline is (filter, draft target, ``reducing_gap``): ``draft`` asks
libjpeg for DCT scaling to no less than ``draft gap`` x the needed size,
``reducing_gap`` lets ``resize`` shrink by an integer factor with ``reduce()``
first.  The **tolerance**: a pipeline is acceptable when its mean SSIM loss
(1 - SSIM) is at most a quarter of what JPEG q80 costs on the same images,
and its worst image's loss at most half the encoder's mean loss -- the
resampling difference then stays well under what the codec changes
anyway.  The cheapest acceptable pipeline is what ``imgserver.processing``
uses (``RESAMPLE``, ``DRAFT_GAP``, ``REDUCING_GAP``); the table marks it.

Also measured: the cost of ``crop=entropy`` (imgserver's transform with and
without it).  ``plain_pillow_rate`` (importable) is the plain-Pillow loop of
the chosen pipeline, the baseline ``bench/server_throughput.py`` compares
imgserver with.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import statistics
import sys
from dataclasses import dataclass
from typing import Sequence

import _common  # noqa: F401  (puts the project on sys.path)
from _common import table
from PIL import Image

import pipeline
from pipeline import corpus_files

from imgserver import processing
from imgserver.params import TransformSpec

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy is needed for SSIM
    np = None


#: Throughput differences smaller than this are not told apart (repeated runs differ so much).
NOISE = 0.05


@dataclass(frozen=True)
class Pipeline:
    name: str
    resample: Image.Resampling
    draft_gap: float  # draft to this multiple of the needed size (JPEG only)
    reducing_gap: float | None


L, BC, BL = Image.Resampling.LANCZOS, Image.Resampling.BICUBIC, Image.Resampling.BILINEAR
PIPELINES = (
    Pipeline("lanczos, draft 2x, gap 2 (imgserver before)", L, 2.0, 2.0),
    Pipeline("lanczos, draft 1x, no gap", L, 1.0, None),
    Pipeline("bicubic, draft 2x, gap 2", BC, 2.0, 2.0),
    Pipeline("bicubic, draft 1x, no gap (NOTES' plain loop)", BC, 1.0, None),
    Pipeline("bicubic, draft 1x, gap 2", BC, 1.0, 2.0),
    Pipeline("bicubic, draft 1.5x, gap 2", BC, 1.5, 2.0),
    Pipeline("lanczos, draft 1.5x, gap 2", L, 1.5, 2.0),
    Pipeline("bilinear, draft 1x, gap 2", BL, 1.0, 2.0),
)

#: The workloads: (name, extensions, width, height, crop, share of --limit).
WORKLOADS = (
    ("JPEG -> 256x256 crop", (".jpg", ".jpeg"), 256, 256, True, 1.0),
    ("JPEG -> 640 wide", (".jpg", ".jpeg"), 640, None, False, 1.0),
    ("PNG/WebP -> 256x256 crop", (".png", ".webp"), 256, 256, True, 0.25),  # slow to decode
)


def target(size: tuple[int, int], width: int, height: int | None, crop: bool):
    """(output size, source box) for a centre crop or a clip to ``width``."""
    w, h = size
    if height is None:
        return (width, max(1, round(h * width / w))), (0.0, 0.0, float(w), float(h))
    if crop:
        if w * height > h * width:
            cw = h * width / height
            return (width, height), ((w - cw) / 2, 0.0, (w + cw) / 2, float(h))
        ch = w * height / width
        return (width, height), (0.0, (h - ch) / 2, float(w), (h + ch) / 2)
    raise ValueError("clip with both sides is not a workload here")


def resize(data: bytes, p: Pipeline, width: int, height: int | None, crop: bool) -> Image.Image:
    """``data`` through pipeline ``p``: the resized RGB image (not encoded)."""
    im = Image.open(io.BytesIO(data))
    size, box = target(im.size, width, height, crop)
    scale = 1.0
    if im.format == "JPEG":
        bw, bh = box[2] - box[0], box[3] - box[1]
        need = (max(1, int(im.width * size[0] / bw * p.draft_gap)), max(1, int(im.height * size[1] / bh * p.draft_gap)))
        full_width = im.width
        drafted = im.draft("RGB", need)
        if drafted is not None:
            scale = drafted[1][2] / full_width
    rgb = im.convert("RGB")
    box = tuple(min(c * scale, limit) for c, limit in zip(box, (*rgb.size, *rgb.size)))
    return rgb.resize(size, p.resample, box=box, reducing_gap=p.reducing_gap)


def reference(data: bytes, width: int, height: int | None, crop: bool) -> Image.Image:
    im = Image.open(io.BytesIO(data)).convert("RGB")
    size, box = target(im.size, width, height, crop)
    return im.resize(size, L, box=box, reducing_gap=None)


def _gaussian(sigma: float = 1.5, radius: int = 5):
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-(x * x) / (2 * sigma * sigma))
    return k / k.sum()


def _blur(a, kernel):
    # Separable "valid" convolution: rows, then columns.
    a = np.apply_along_axis(lambda r: np.convolve(r, kernel, mode="valid"), 1, a)
    return np.apply_along_axis(lambda c: np.convolve(c, kernel, mode="valid"), 0, a)


def ssim(a: Image.Image, b: Image.Image) -> float:
    """Mean SSIM of the luma of two same-sized images (K1 0.01, K2 0.03, L 255)."""
    x = np.asarray(a.convert("L"), dtype=np.float64)
    y = np.asarray(b.convert("L"), dtype=np.float64)
    k = _gaussian()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = _blur(x, k), _blur(y, k)
    sxx = _blur(x * x, k) - mx * mx
    syy = _blur(y * y, k) - my * my
    sxy = _blur(x * y, k) - mx * my
    num = (2 * mx * my + c1) * (2 * sxy + c2)
    den = (mx * mx + my * my + c1) * (sxx + syy + c2)
    return float((num / den).mean())


def encoded_loss(ref: Image.Image, quality: int = 80) -> float:
    out = io.BytesIO()
    ref.save(out, "JPEG", quality=quality)
    return 1 - ssim(ref, Image.open(io.BytesIO(out.getvalue())))


def rate(datas: list[bytes], p: Pipeline, width: int, height: int | None, crop: bool,
         threads: int, seconds: float) -> float:
    """Images/s (``pipeline.last_cpu_use`` then holds CPU seconds per second)."""
    params = {"quality": 80, "optimize": False, "progressive": False}

    def work(i: int) -> None:
        processing._encode_to_fd(resize(datas[i % len(datas)], p, width, height, crop), "jpeg", params)

    return pipeline._run_threads(work, threads, seconds, min_items=len(datas))


def plain_pillow_rate(paths: Sequence[str], threads: int, seconds: float, size: int = 256) -> float:
    """Images/s of the plain-Pillow loop of imgserver's pipeline (``processing.RESAMPLE``,
    ``DRAFT_GAP``, ``REDUCING_GAP``): a ``size`` x ``size`` centre crop, JPEG q80 into a
    memfd, images in memory -- no imgserver code but the encoder helper."""
    datas = []
    for path in paths:
        with open(path, "rb") as f:
            datas.append(f.read())
    random.Random(0).shuffle(datas)
    chosen = Pipeline("imgserver's", processing.RESAMPLE, processing.DRAFT_GAP, processing.REDUCING_GAP)
    return rate(datas, chosen, size, size, True, threads, seconds)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", help="directory of JPEG/PNG/WebP images")
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds per throughput cell (default 4)")
    parser.add_argument("--threads", type=int, default=2, help="threads (default 2)")
    parser.add_argument("--repeat", type=int, default=2, help="interleaved runs per cell, best kept (default 2)")
    parser.add_argument("--limit", type=int, default=24, help="images per workload (default 24)")
    args = parser.parse_args(argv)
    if np is None:
        print("numpy is needed for SSIM (pip install numpy)", file=sys.stderr)
        return 2
    print(f"Pillow {Image.__version__}, numpy {np.__version__}, {os.cpu_count()} CPUs, "
          f"{args.threads} threads, {args.seconds:g} s x {args.repeat} per throughput cell; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    summary = []
    everywhere = set(PIPELINES)  # acceptable on every workload
    speedups: dict[Pipeline, list[float]] = {p: [] for p in PIPELINES}  # per workload, vs the first
    quality_of = {p: 0.0 for p in PIPELINES}  # mean SSIM summed over the workloads
    for name, extensions, width, height, crop, share in WORKLOADS:
        paths = corpus_files(args.corpus, extensions)[: max(2, round(args.limit * share))]
        if not paths:
            continue
        datas = [open(p, "rb").read() for p in paths]
        refs = [reference(d, width, height, crop) for d in datas]
        codec = statistics.mean(encoded_loss(r) for r in refs)
        scores = {p: [ssim(resize(d, p, width, height, crop), r) for d, r in zip(datas, refs)] for p in PIPELINES}
        rates = {p: 0.0 for p in PIPELINES}
        per_cpu = {p: 0.0 for p in PIPELINES}
        for r in range(args.repeat):
            for p in (PIPELINES if r % 2 == 0 else PIPELINES[::-1]):
                images = rate(datas, p, width, height, crop, args.threads, args.seconds)
                rates[p] = max(rates[p], images)
                per_cpu[p] = max(per_cpu[p], images / max(pipeline.last_cpu_use, 1e-9))
        acceptable = {p for p in PIPELINES
                      if 1 - statistics.mean(scores[p]) <= codec / 4 and 1 - min(scores[p]) <= codec / 2}
        best = max(acceptable, key=lambda p: per_cpu[p]) if acceptable else None
        everywhere &= acceptable
        for p in PIPELINES:
            quality_of[p] += statistics.mean(scores[p])
            speedups[p].append(per_cpu[p] / max(per_cpu[PIPELINES[0]], 1e-9))
        rows = []
        for p in PIPELINES:
            mark = "<- cheapest acceptable" if p is best else ("ok" if p in acceptable else "too lossy")
            rows.append([p.name, f"{statistics.mean(scores[p]):.4f}", f"{min(scores[p]):.4f}",
                         f"{1 - statistics.mean(scores[p]):.4f}", f"{per_cpu[p]:.1f}", f"{rates[p]:.1f}", mark])
        print(f"\n{name}: {len(datas)} images; JPEG q80's own SSIM loss {codec:.4f} "
              f"(tolerance: mean loss <= {codec / 4:.4f}, worst <= {codec / 2:.4f})")
        print(table(["pipeline", "SSIM mean", "SSIM worst", "loss", "images/CPU-s", "images/s", ""], rows))
        if best is not None:
            summary.append([name, best.name, f"{per_cpu[best]:.1f}",
                            f"{per_cpu[best] / per_cpu[PIPELINES[0]]:.2f}x"])

    jpegs = corpus_files(args.corpus, (".jpg", ".jpeg"))[: args.limit]
    if jpegs:
        datas = [open(p, "rb").read() for p in jpegs]
        plain = TransformSpec(256, 256, "crop", "jpeg", 80)
        entropy = TransformSpec(256, 256, "crop", "jpeg", 80, crop=("entropy",))

        def transform_rate(spec: TransformSpec) -> float:
            work = lambda i: processing.transform(datas[i % len(datas)], spec, 50_000_000)  # noqa: E731
            return pipeline._run_threads(work, args.threads, args.seconds, min_items=len(datas))

        plain_rate = entropy_rate = 0.0
        for _ in range(args.repeat):
            plain_rate = max(plain_rate, transform_rate(plain) / max(pipeline.last_cpu_use, 1e-9))
            entropy_rate = max(entropy_rate, transform_rate(entropy) / max(pipeline.last_cpu_use, 1e-9))
        print(f"\ncrop=entropy: imgserver transform 256x256 crop q80, {plain_rate:.1f} images/CPU-s centred, "
              f"{entropy_rate:.1f} with crop=entropy: {1000 * (1 / entropy_rate - 1 / plain_rate):.1f} ms "
              f"of CPU more per image ({100 * (plain_rate / entropy_rate - 1):.0f}%)")
    if summary:
        print()
        print(table(["workload", "cheapest acceptable pipeline", "images/CPU-s", "vs imgserver before"], summary))
    if everywhere:
        gain = {p: statistics.geometric_mean(speedups[p]) for p in everywhere}
        # Within NOISE of the cheapest counts as as cheap (repeated runs on a shared
        # machine differ by that much): of those, the best mean SSIM wins.
        fastest = max(gain.values())
        chosen = max((p for p in everywhere if gain[p] >= fastest * (1 - NOISE)), key=lambda p: quality_of[p])
        print(f"\nacceptable on every workload: {', '.join(p.name for p in PIPELINES if p in everywhere)}")
        print(f"cheapest of them (geometric mean over the workloads of images/CPU-s vs imgserver before): "
              f"{chosen.name}, {gain[chosen]:.2f}x ("
              + ", ".join(f"{w[0]} {x:.2f}x" for w, x in zip(WORKLOADS, speedups[chosen])) + ")")
    print(f"\nimgserver uses: RESAMPLE={processing.RESAMPLE.name}, DRAFT_GAP={processing.DRAFT_GAP}, "
          f"REDUCING_GAP={processing.REDUCING_GAP}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
