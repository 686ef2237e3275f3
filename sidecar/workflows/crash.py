"""Test-only kill points: `SIDECAR_CRASH_AT=after-action:claim` SIGKILLs the process there.

The crash tests and `make demo` use it to stop a sidecar at an exact moment
of a workflow (before a step is sent, after the app has applied it but
before the sidecar has recorded that, during a compensation) instead of
hoping a sleep lands there. Unset, `reach` is one comparison. The points:

    before-action:STEP   after-action:STEP        (the step's action)
    before-compensation:STEP   after-compensation:STEP
    before-delivery:TARGET   after-delivery:TARGET   (a fan-out target)
    after-ship                                   (the collector acknowledged a batch)
"""

from __future__ import annotations

import os
import signal

VARIABLE = "SIDECAR_CRASH_AT"
_POINT = os.environ.get(VARIABLE) or None


def reach(point: str) -> None:
    """SIGKILL this process if `point` is the one SIDECAR_CRASH_AT names."""
    if _POINT is not None and point == _POINT:
        os.kill(os.getpid(), signal.SIGKILL)
