"""Ray worker setup hook for tests: a video whose path contains CRASH_MARKER kills the process
that decodes it (os._exit, as a decoder segfault or the OOM killer would), in every worker.

Used as runtime_env={"worker_process_setup_hook": "tests.crash_injection.install"}; nothing in
the library knows about it.
"""
from __future__ import annotations

import os

CRASH_MARKER = "crash_me"


def install() -> None:
    import pipeline.preprocess as preprocess

    real = preprocess.iter_frame_chunks

    def crashing_iter_frame_chunks(uri, sampling):
        if CRASH_MARKER in str(uri):
            os._exit(139)  # no exception, no cleanup: the process is simply gone
        return real(uri, sampling)

    preprocess.iter_frame_chunks = crashing_iter_frame_chunks
