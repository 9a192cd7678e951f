"""A graceful VM stop over QMP: system_powerdown, then wait for QEMU's SHUTDOWN event.

Two users, one code: qemu_vm's `stopped`/`absent` (import) and the ExecStop of each VM's unit,
so a node shutdown or `systemctl stop` powers the guest down instead of SIGTERMing QEMU.
qemu_vm writes this file unchanged to /var/lib/netloom/vms/vmstop.py on the node; it therefore
imports only the standard library and qemu.qmp (no module_utils).

    python3 -I vmstop.py QMP_SOCKET TIMEOUT   exit 0: powered down, or QEMU was not running;
                                           exit 1: no SHUTDOWN in time, or no qemu.qmp
                                           (systemd then sends SIGTERM, later SIGKILL)
-I: the script's folder is not put on sys.path (it must not shadow the `qemu` package).
"""

from __future__ import annotations

import sys
import time
from typing import Any

try:
    from qemu.qmp.legacy import QEMUMonitorProtocol
except ImportError:  # the module reports the missing library itself; the unit then just kills QEMU
    QEMUMonitorProtocol = None


def connect(path: str, timeout: float = 10.0) -> Any:
    """A negotiated qemu.qmp client on the VM's QMP socket (OSError when nothing listens)."""
    client = QEMUMonitorProtocol(path)
    client.settimeout(timeout)
    try:
        client.connect(negotiate=True)
    except OSError:
        raise
    except Exception as err:  # qemu.qmp's ConnectError: nothing (or no QEMU) listens on the socket
        raise OSError(f"no QMP answer: {err}") from err
    return client


def powerdown(client: Any, timeout: float) -> bool:
    """system_powerdown, then wait for the SHUTDOWN event; whether it came in time."""
    client.cmd("system_powerdown")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            event = client.pull_event(wait=float(max(0.1, deadline - time.monotonic())))
        except Exception:  # asyncio.TimeoutError, or EOF when QEMU already left: no event in time
            return False
        if event and event.get("event") == "SHUTDOWN":
            return True
    return False


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: vmstop.py QMP_SOCKET TIMEOUT_SECONDS", file=sys.stderr)
        return 2
    if QEMUMonitorProtocol is None:
        print("vmstop: the Python library qemu.qmp is not installed; systemd stops QEMU", file=sys.stderr)
        return 1
    try:
        client = connect(argv[0])
    except OSError as err:  # QEMU already gone (it exited on its own, or was killed): nothing to stop
        print(f"vmstop: {argv[0]}: {err}; nothing to power down")
        return 0
    try:
        if powerdown(client, float(argv[1])):
            print("vmstop: guest powered down")
            return 0
        print(f"vmstop: no SHUTDOWN within {argv[1]} s; systemd stops QEMU", file=sys.stderr)
        return 1
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
