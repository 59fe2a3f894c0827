"""A Ray worker_process_setup_hook for tests/test_ray.py: kill a worker mid-run, once.

Run in every Ray worker process as it starts. When $SWSSL_TEST_KILL_FLAG names a file, the first worker
to begin scoring its second frame while that file exists removes it and exits at once (os._exit: no
cleanup, like a crash or an OOM kill). Only the first attempt sees the file, so the restarted worker and
the retried file go through."""
from __future__ import annotations

import os

KILL_FLAG = "SWSSL_TEST_KILL_FLAG"


def kill_on_second_frame() -> None:
    flag = os.environ.get(KILL_FLAG)
    if not flag:
        return
    from swssl.inference import runner

    real, calls = runner.score_frame, []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            try:
                os.unlink(flag)
            except FileNotFoundError:  # another worker died already
                pass
            else:
                os._exit(1)
        return real(*args, **kwargs)

    runner.score_frame = dying
