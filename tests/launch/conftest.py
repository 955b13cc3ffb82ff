import pytest

from tests.launch.launchers import make_fakes


@pytest.fixture
def fakes(tmp_path):
    """(env, log, bin folder): recording fakes of torchrun, srun, scontrol, docker and nvidia-smi first on PATH."""
    return make_fakes(tmp_path)
