"""`lymph` for the torchrun tests, with a fault planted on one rank (not a test module).

- ``LYMPH_TEST_FAIL_RANK=r``: rank ``r`` fails at its second training step, with a
  LymphError (``LYMPH_TEST_FAIL_KIND=error``, the default) or a RuntimeError (``crash``);
- ``LYMPH_TEST_SLOW_MAIN=s``: rank 0's ingest of ``--data`` starts ``s`` seconds late (long
  rank-0-only work);
- ``LYMPH_TEST_OWN_FOLDER=1``: ranks 1 and up run in a folder of their own, as on a second
  machine without a shared filesystem (a relative ``--out`` then names another folder).
"""

from __future__ import annotations

import os
from pathlib import Path

rank = int(os.environ.get("RANK", "0"))
if os.environ.get("LYMPH_TEST_OWN_FOLDER") == "1" and rank > 0:
    own = Path(f"rank{rank}")
    own.mkdir(exist_ok=True)
    os.chdir(own)
if os.environ.get("LYMPH_TEST_FAIL_RANK") == str(rank):
    from lymph.encoder import train as T
    from lymph.errors import LymphError

    real, calls = T.train_step, []

    def failing_step(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 2:
            if os.environ.get("LYMPH_TEST_FAIL_KIND") == "crash":
                raise RuntimeError(f"planted crash on rank {rank}")
            raise LymphError(f"planted failure on rank {rank}")
        return real(*args, **kwargs)

    T.train_step = failing_step

if os.environ.get("LYMPH_TEST_SLOW_MAIN") and rank == 0:
    import time

    from lymph.encoder import run as E

    real_ingest = E._ingest_with_progress

    def slow_ingest(*args, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(float(os.environ["LYMPH_TEST_SLOW_MAIN"]))
        return real_ingest(*args, **kwargs)

    E._ingest_with_progress = slow_ingest

from lymph.cli import app

app(prog_name="lymph")
