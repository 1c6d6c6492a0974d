"""Profiles run workers when `ERGOT_BENCH_PROFILE_DIR` is set (the latency benchmark's --profile).

This folder is put first on PYTHONPATH of the plane under test; Python imports `sitecustomize`
at start-up, before anything else, so the profile covers the worker's imports too. Only run
workers (spawned by the code server) are profiled; every other process starts as usual.
"""

import os
import sys

_DIR = os.environ.get("ERGOT_BENCH_PROFILE_DIR")

# The code server spawns run workers with multiprocessing (`--multiprocessing-fork`).
if _DIR and ("execute_run" in sys.argv or "--multiprocessing-fork" in sys.argv):
    import atexit
    import time

    from pyinstrument import Profiler

    _profiler = Profiler(interval=0.001)
    _profiler.start()

    def _write() -> None:
        _profiler.stop()
        os.makedirs(_DIR, exist_ok=True)
        name = os.path.join(_DIR, f"worker-{int(time.time() * 1000)}-{os.getpid()}.txt")
        with open(name, "w") as out:
            out.write(_profiler.output_text(unicode=False, color=False, show_all=False))

    atexit.register(_write)
