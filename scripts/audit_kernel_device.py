"""pytest plugin: on a CPU machine, check that the kernel tests would run on CUDA pools on a CUDA
host, i.e. that every Triton launch goes through ``kvtest.pool_on`` (which then moves pools to
the GPU). With KVTEST_FORCE_MOVE=1, pool_on copies and marks pools even on the CPU; this plugin
fails the session if any launch sees an unmarked pool.

    TRITON_INTERPRET=1 KVTEST_FORCE_MOVE=1 PYTHONPATH=.:scripts \\
        python -m pytest -q -p audit_kernel_device tests/kernels
"""

import traceback

import cpkv.kernels.paged_copy as paged_copy

_launch = paged_copy._launch
LAUNCHES, UNMOVED = [0], []


def _audited(cache, *args, **kwargs):
    LAUNCHES[0] += 1
    if not getattr(cache, "on_kernel_device", False):
        UNMOVED.append("".join(traceback.format_stack(limit=6)))
    return _launch(cache, *args, **kwargs)


paged_copy._launch = _audited


def pytest_sessionfinish(session, exitstatus):
    print(f"\naudit: {LAUNCHES[0]} Triton launches, {len(UNMOVED)} on pools not moved to the "
          f"kernel device")
    for stack in UNMOVED[:3]:
        print(stack)
    if UNMOVED or not LAUNCHES[0]:
        session.exitstatus = 1
