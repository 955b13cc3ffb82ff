import subprocess
import sys

from data.seeding import position_seed


def test_position_seed_is_the_same_in_another_process_with_another_hash_seed():
    code = "from data.seeding import position_seed; print(position_seed(3, 1, 7, 42))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""}, cwd=".")
    assert int(out.stdout) == position_seed(3, 1, 7, 42)


def test_position_seed_separates_positions_and_fits_a_generator_seed():
    seeds = {position_seed(0, rank, step) for rank in range(4) for step in range(500)}
    assert len(seeds) == 2000  # no two positions share a seed
    assert all(0 <= s < 2**63 for s in seeds)
    assert position_seed(0, 1, 2) != position_seed(0, 2, 1)  # order matters
    assert position_seed(1, 2) != position_seed(1, 2, 0)  # length matters
