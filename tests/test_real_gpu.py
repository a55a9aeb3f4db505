"""On a real GPU (CuPy and a CUDA device; skipped otherwise, as on this
project's CI): every solver trains on the device as on the CPU (relative
1e-4, the golden tolerance), and netlib's NCCL calls run on the real
cupy.cuda.nccl with one rank.  The golden cases on the device:
``NETLIB_TEST_XP=cupy python -m pytest tests/test_golden.py``."""
import numpy as np
import pytest

from test_device_training import RULES, assert_same, train, weights, work  # noqa: F401  (work: fixture)


def _cupy():
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
    except Exception:
        return None
    return cupy


CUPY = _cupy()
pytestmark = pytest.mark.skipif(CUPY is None, reason="needs CuPy and a CUDA device (a real GPU)")


@pytest.mark.parametrize("kind", sorted(RULES))
def test_solver_on_the_gpu_matches_the_cpu(work, kind):  # noqa: F811
    cpu = weights(train(kind, np, 6).net)
    gpu = weights(train(kind, CUPY, 6).net)
    assert_same(cpu, gpu, rtol=1e-4, atol=1e-5)


def test_nccl_collectives_with_one_real_rank():
    from netlib import backend, nccl
    if not nccl.has_nccl():
        pytest.skip("CuPy has no NCCL here")
    backend.set_mode_gpu()
    try:
        w = nccl.NcclWorld(1, nccl.new_uid(), 0)
        buf = CUPY.arange(5, dtype=CUPY.float32)
        w.allreduce_sum(buf)
        w.bcast_array(buf)
        assert buf.get().tolist() == [0, 1, 2, 3, 4]
        assert w.bcast_bytes(b"netlib") == b"netlib"
        assert w.allgather_text("rank0") == ["rank0"]
        assert w.gather_json({"a": 1}) == [{"a": 1}]
    finally:
        backend.set_mode_cpu()
