"""data.beton_writer: FFCV's file byte for byte, and an error (not an endless wait) when a writer process dies."""
import os
import signal
from pathlib import Path

import numpy as np
import pytest

ffcv = pytest.importorskip("ffcv", reason="FFCV is not installed (bash launch/install.sh --ffcv)")

from data.beton_writer import WriterDied, write_indexed  # noqa: E402


def fields():
    from ffcv.fields import IntField, RGBImageField

    return {"image": RGBImageField(write_mode="raw"), "label": IntField()}


def samples(count=12):
    rng = np.random.default_rng(0)
    return [(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8), i % 3) for i in range(count)]


class DiesAt:
    """samples(), except that reading sample `index` ends its process: by an exception, or by a signal."""

    def __init__(self, index: int, how: str):
        self.items, self.index, self.how = samples(), index, how

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        if i == self.index and self.how == "raise":
            raise OSError(f"cannot read sample {i}")
        if i == self.index:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.items[i]


def shared_memory_segments() -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir()} if Path("/dev/shm").is_dir() else set()


def test_the_file_is_ffcvs_own_byte_for_byte(tmp_path):
    from ffcv.writer import DatasetWriter

    DatasetWriter(str(tmp_path / "ffcv.beton"), fields(), num_workers=1).from_indexed_dataset(samples())
    write_indexed(tmp_path / "ours.beton", fields(), samples(), num_workers=1)
    assert (tmp_path / "ours.beton").read_bytes() == (tmp_path / "ffcv.beton").read_bytes()


@pytest.mark.parametrize("how, code", [("raise", "exit code 1"), ("kill", "signal 9")])
def test_a_dying_writer_process_is_an_error_naming_how_it_ended(tmp_path, how, code):
    before = shared_memory_segments()
    with pytest.raises(WriterDied, match=code):
        write_indexed(tmp_path / "x.beton", fields(), DiesAt(5, how), num_workers=2)
    import multiprocessing

    assert multiprocessing.active_children() == []  # the other worker was stopped and every one reaped
    assert shared_memory_segments() <= before  # FFCV's metadata segment released


@pytest.mark.slow  # fault injection: a subprocess writing the digits onto a full disk
@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs (root)")
def test_a_full_disk_ends_prepare_with_the_workers_error(tmp_path):
    """The fault behind an endless wait once seen in the suite: the disk fills while a worker writes its pages."""
    import subprocess
    import sys

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        proc = subprocess.run([sys.executable, "-m", "data.prepare", "--dataset", "digits", "--out",
                               str(disk / "d.beton"), "--num-workers", "2"], cwd=Path(__file__).parents[2],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert "No space left on device" in proc.stderr and "a .beton writer process" in proc.stderr, proc.stderr
        assert list(disk.iterdir()) == []  # no partial file under either name
    finally:
        subprocess.run(["umount", str(disk)])
