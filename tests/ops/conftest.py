import importlib.util
import multiprocessing as mp
import os

import pytest
import torch

from tests.ops import cases


@pytest.fixture(autouse=True)
def _one_thread():
    # Several engineers share two cores; the sizes here are small anyway.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def _triton_worker():
    """One fresh process running triton's CPU interpreter.

    Triton reads TRITON_INTERPRET when it decorates kernels, its own standard library
    included, i.e. when `triton` is first imported: a process that imported it without
    the flag cannot switch. So triton cases run in a spawned child that starts with it set.
    """
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        pool = mp.get_context("spawn").Pool(1, initializer=cases.init_triton_worker)
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
    yield pool
    pool.close()
    pool.join()


@pytest.fixture
def run(request, backend):
    """`run(case, *args)` calls `case(backend, *args)`: in this process, or for "triton"
    in the interpreter worker. Parametrize `backend` to use it."""
    if backend == "triton":
        pool = request.getfixturevalue("_triton_worker")
        return lambda case, *args: pool.apply(case, (backend, *args))
    return lambda case, *args: case(backend, *args)
