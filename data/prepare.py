"""`python -m data.prepare`: a labeled image source -> an FFCV .beton (image + label), written atomically.

    python -m data.prepare --dataset stl10 --split train+unlabeled --out datasets/stl10/train_unlabeled.beton --download
    python -m data.prepare --dataset imagefolder --data-dir datasets/imagenet/train --out datasets/imagenet/train.beton

Paths starting with datasets/ are under the data root: $SIMCLR_DATA when set, else ./datasets
(data.sources.resolve_data_path, the rule dataset.path follows too); --data-dir defaults to datasets/<dataset>.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.beton_writer import WriterDied, write_indexed
from data.sources import NAMES, as_rgb_array, image_path, open_source, resolve_data_path

_PLACEHOLDER = np.zeros((8, 8, 3), dtype=np.uint8)


class _Guarded:
    """(HWC uint8 array, int label) for FFCV's writer; an unreadable image is flagged in shared memory and
    written as a placeholder, so that one pass finds every unreadable image (an exception would end the writer
    process, and the write with it: data.beton_writer.WriterDied); the caller checks the flags after the write."""

    def __init__(self, source, indices: list[int]):
        self.source, self.indices = source, indices
        self.bad = mp.RawArray("b", len(indices))  # inherited by the writer's worker processes

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        try:
            image, label = self.source[self.indices[i]]
            return as_rgb_array(image), int(label)
        except Exception:  # noqa: BLE001 - any failure to read or decode makes the sample unreadable
            self.bad[i] = 1
            return _PLACEHOLDER, -1

    def unreadable(self) -> list[int]:
        return [self.indices[i] for i in np.flatnonzero(np.frombuffer(self.bad, dtype=np.int8))]


def describe(source, index: int) -> str:
    """'<file or sample i> (<error>)' for an unreadable sample, re-reading it to get the error."""
    name = image_path(source, index) or f"sample {index}"
    try:
        as_rgb_array(source[index][0])
        return f"{name} (unreadable while writing)"
    except Exception as err:  # noqa: BLE001
        return f"{name} ({type(err).__name__}: {err})"


def _write(source, indices: list[int], path: Path, fields: dict, num_workers: int) -> list[int]:
    """Writes the samples `indices` to `path`; returns the unreadable ones among them."""
    dataset = _Guarded(source, indices)
    write_indexed(path, fields, dataset, num_workers)
    return dataset.unreadable()


@dataclass(frozen=True)
class ImageEncoding:
    """How the images are stored: jpg (small files, a decode per read), raw (fastest reads, ~10x the disk),
    proportion / smart (FFCV's mixes); the longest side kept (None: as they are); the JPEG quality."""

    write_mode: str = "jpg"
    max_resolution: int | None = None
    jpeg_quality: int = 90


def prepare(dataset: str, out: str | Path, data_dir: str | None = None, split: str = "train",
            encoding: ImageEncoding = ImageEncoding(), skip_bad: bool = False, download: bool = False,
            num_workers: int = -1) -> dict:
    """Writes the .beton; returns {"written": n, "skipped": [descriptions], "out": path}.

    Images are decoded once, by the writer's processes. An unreadable image raises ValueError naming its file
    unless skip_bad, which rewrites without it (a second pass only then) and reports it. The file appears
    under its name only when complete (written as a hidden temporary, then os.replace'd). data_dir and out
    follow data.sources.resolve_data_path (datasets/... is under $SIMCLR_DATA when set).
    """
    from ffcv.fields import IntField, RGBImageField

    data_dir = resolve_data_path(data_dir)
    source = open_source(dataset, data_dir, split, download)
    out = Path(resolve_data_path(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    fields = {"image": RGBImageField(write_mode=encoding.write_mode, max_resolution=encoding.max_resolution,
                                     jpeg_quality=encoding.jpeg_quality),
              "label": IntField()}
    try:
        indices = list(range(len(source)))
        bad = _write(source, indices, tmp, fields, num_workers)
        skipped = [describe(source, i) for i in bad]
        if bad and not skip_bad:
            raise ValueError(f"unreadable image: {skipped[0]}" + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")
                             + "; --skip-bad leaves such images out")
        if bad:
            good = sorted(set(indices) - set(bad))
            if not good:
                raise ValueError(f"no readable images in {data_dir or dataset}")
            if _write(source, good, tmp, fields, num_workers):
                raise ValueError(f"images of {data_dir} became unreadable during the second pass")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"written": len(source) - len(bad), "skipped": skipped, "out": str(out)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, choices=NAMES)
    parser.add_argument("--data-dir", help="the data set's root directory (default datasets/<dataset>; not "
                                           "needed for digits)")
    parser.add_argument("--split", default="train", help="train | test; STL10 also unlabeled, train+unlabeled")
    parser.add_argument("--out", required=True, help="the .beton file to write, e.g. datasets/<dataset>/train.beton")
    parser.add_argument("--write-mode", default="jpg", choices=["jpg", "raw", "proportion", "smart"],
                        help="jpg: small files, decode cost per read; raw: fastest reads, ~10x the disk")
    parser.add_argument("--max-resolution", type=int, help="longest side stored (256-512 for ImageNet)")
    parser.add_argument("--jpeg-quality", type=int, default=90)
    parser.add_argument("--skip-bad", action="store_true", help="leave unreadable images out and report them")
    parser.add_argument("--download", action="store_true", help="fetch CIFAR / STL10 with torchvision first")
    parser.add_argument("--num-workers", type=int, default=-1, help="writer processes (default: all cores)")
    args = parser.parse_args(argv)
    if args.data_dir is None and args.dataset != "digits":
        args.data_dir = f"datasets/{args.dataset}"
    try:
        encoding = ImageEncoding(args.write_mode, args.max_resolution, args.jpeg_quality)
        result = prepare(args.dataset, args.out, args.data_dir, args.split, encoding, args.skip_bad, args.download,
                         args.num_workers)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except WriterDied as err:  # e.g. the disk filled up: the worker's own error is printed above this line
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the write is atomic: the temporary file is gone, an earlier --out file untouched
        print(f"interrupted: {args.out} not written", file=sys.stderr)
        return 130
    if result["skipped"]:
        print(f"skipped {len(result['skipped'])} unreadable image(s):", *result["skipped"], sep="\n  ", file=sys.stderr)
    print(f"wrote {result['written']} images to {result['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
