import pytest
import torch

from tests.ops.truth import interpreted_triton


@pytest.fixture(autouse=True)
def _one_thread():
    # Several engineers share two cores; the sizes here are small anyway.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def backend(request, monkeypatch):
    """Parametrize with indirect=True; "triton" runs under the CPU interpreter in fp32."""
    name = request.param
    if name == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        interpreted_triton()
    return name
