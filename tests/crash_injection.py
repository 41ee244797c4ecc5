"""Ray worker setup hook for tests: faults injected into decoding, in every worker, by video path.

- a path containing CRASH_MARKER kills the process that decodes it (os._exit, as a decoder
  segfault or the OOM killer would);
- a path containing HANG_MARKER blocks its decoder for an hour (a hung read or codec);
- a path containing SLOW_MARKER decodes normally but waits SLOW_SECONDS before each chunk (to keep
  a run going while a test adds or kills a node).

Used as runtime_env={"worker_process_setup_hook": "tests.crash_injection.install"}; nothing in
the library knows about it.
"""
from __future__ import annotations

import os
import time

CRASH_MARKER = "crash_me"
HANG_MARKER = "hang_me"
SLOW_MARKER = "slow_me"
SLOW_SECONDS = float(os.environ.get("HMHN_TEST_SLOW_SECONDS", "1.0"))


def install() -> None:
    import pipeline.preprocess as preprocess

    real = preprocess.iter_frame_chunks

    def faulty_iter_frame_chunks(uri, sampling):
        if CRASH_MARKER in str(uri):
            os._exit(139)  # no exception, no cleanup: the process is simply gone
        if HANG_MARKER in str(uri):
            time.sleep(3600)
        if SLOW_MARKER in str(uri):
            return _slowly(real(uri, sampling))
        return real(uri, sampling)

    preprocess.iter_frame_chunks = faulty_iter_frame_chunks


def _slowly(chunks):
    for chunk in chunks:
        time.sleep(SLOW_SECONDS)
        yield chunk
