"""`python -m data.prepare`: a labeled image source -> an FFCV .beton (image + label), written atomically."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from data.sources import NAMES, as_rgb_array, image_path, open_source


class _Checked:
    """The readable samples of a source, as (HWC uint8 array, int label) for FFCV's writer."""

    def __init__(self, source, indices: list[int]):
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        image, label = self.source[self.indices[i]]
        return as_rgb_array(image), int(label)


def find_unreadable(source, progress_every: int = 5000) -> tuple[list[int], list[str]]:
    """(readable indices, descriptions of the unreadable samples): each image is fully decoded once."""
    good, bad = [], []
    for i in range(len(source)):
        try:
            image, _ = source[i]
            as_rgb_array(image)
            good.append(i)
        except Exception as err:  # noqa: BLE001 - any decoding failure makes the sample unreadable
            bad.append(f"{image_path(source, i) or f'sample {i}'} ({type(err).__name__}: {err})")
        if progress_every and (i + 1) % progress_every == 0:
            print(f"checked {i + 1}/{len(source)} images", file=sys.stderr, flush=True)
    return good, bad


def prepare(dataset: str, out: str | Path, data_dir: str | None = None, split: str = "train",
            write_mode: str = "jpg", max_resolution: int | None = None, jpeg_quality: int = 90,
            skip_bad: bool = False, download: bool = False, num_workers: int = -1) -> dict:
    """Writes the .beton; returns {"written": n, "skipped": [...]}. An unreadable image raises an error
    naming its file unless skip_bad, which leaves it out and reports it."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    source = open_source(dataset, data_dir, split, download)
    good, bad = find_unreadable(source)
    if bad and not skip_bad:
        raise ValueError(f"unreadable image: {bad[0]}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
                         + "; use --skip-bad to leave such images out")
    if not good:
        raise ValueError(f"no readable images in {data_dir or dataset}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    fields = {"image": RGBImageField(write_mode=write_mode, max_resolution=max_resolution,
                                     jpeg_quality=jpeg_quality),
              "label": IntField()}
    try:
        DatasetWriter(str(tmp), fields, num_workers=num_workers).from_indexed_dataset(_Checked(source, good))
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"written": len(good), "skipped": bad, "out": str(out)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.prepare", description=__doc__)
    parser.add_argument("--dataset", required=True, choices=NAMES)
    parser.add_argument("--data-dir", help="the data set's root directory (not needed for digits)")
    parser.add_argument("--split", default="train", help="train | test; STL10 also unlabeled, train+unlabeled")
    parser.add_argument("--out", required=True, help="the .beton file to write")
    parser.add_argument("--write-mode", default="jpg", choices=["jpg", "raw", "proportion", "smart"])
    parser.add_argument("--max-resolution", type=int, help="longest side stored (e.g. 256 for ImageNet)")
    parser.add_argument("--jpeg-quality", type=int, default=90)
    parser.add_argument("--skip-bad", action="store_true", help="leave unreadable images out and report them")
    parser.add_argument("--download", action="store_true", help="fetch the data set with torchvision first")
    parser.add_argument("--num-workers", type=int, default=-1)
    args = parser.parse_args(argv)
    try:
        result = prepare(args.dataset, args.out, args.data_dir, args.split, args.write_mode, args.max_resolution,
                         args.jpeg_quality, args.skip_bad, args.download, args.num_workers)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if result["skipped"]:
        print(f"skipped {len(result['skipped'])} unreadable image(s):", *result["skipped"], sep="\n  ", file=sys.stderr)
    print(f"wrote {result['written']} images to {result['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
