"""Threads sharing one probe of a deep bundle (taps completed by the numpy kernels under the one-thread BLAS
limit): the results of a serial run, and the process's BLAS thread count as it was (issue 10, item 6).

Not bitwise: with the OpenBLAS that numpy 2.4 ships (0.3.31), ``openblas_set_num_threads`` called from a
worker thread is sometimes not honoured, so a tap column computed there may be summed by two BLAS threads
and differ from the serial run in the last float32 bit. Everything ONNX Runtime computes is bitwise equal.
"""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import gradprobe

pytestmark = pytest.mark.timeout(300)


def test_threaded_runs_match_the_serial_run_and_leave_the_blas_thread_count_alone(bundles):
    threadpoolctl = pytest.importorskip("threadpoolctl")

    def blas_threads():
        return sorted(info["num_threads"] for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas")

    if not blas_threads():
        pytest.skip("numpy reports no BLAS thread pool here")
    probe = gradprobe.load(bundles["deep"])
    images = np.random.default_rng(5).random((2, 1, 28, 28), dtype=np.float32)
    expected = probe.run(images)
    with threadpoolctl.threadpool_limits(3, user_api="blas"):  # a count the one-thread limit must give back
        before = blas_threads()
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda _: probe.run(images), range(6)))
        assert blas_threads() == before == [3] * len(before)
    for result in results:
        for name, value in expected.outputs.items():
            if name == "layer_grad_sqnorm":
                np.testing.assert_allclose(result[name], value, rtol=1e-6, err_msg=name)
            else:
                np.testing.assert_array_equal(result[name], value, err_msg=name)
