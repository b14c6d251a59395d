"""Is a process alive? One check shared by the stage lock manager (a lock whose holder died is
broken) and `glyph server` (a pid file whose server died is stale)."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True
