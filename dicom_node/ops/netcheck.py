"""Name the real reason an outgoing association failed (refused, unreachable, timed out).

pynetdicom reports a TCP failure as an aborted association and logs the socket error on its own
logger; an operator running ``push``/``echo`` (or reading the outbox) needs the socket error in
the one line that reports the failure.
"""

from __future__ import annotations

import socket
from typing import Any


def connect_error(host: str, port: int, timeout: float = 5.0) -> str | None:
    """Try a plain TCP connection; return why it fails (``None`` if it connects)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except socket.gaierror as exc:
        return f"cannot resolve host {host!r}: {exc.strerror or exc}"
    except TimeoutError:
        return f"connection timed out after {timeout:g} s"
    except OSError as exc:
        return (exc.strerror or str(exc)).lower()


def association_failure(assoc: Any, host: str, port: int, timeout: float = 5.0) -> str:
    """Words for an association that was not established: rejected, or the socket error."""
    if getattr(assoc, "is_rejected", False):
        return "rejected"
    reason = connect_error(host, port, timeout=min(timeout, 5.0))
    if reason is not None:
        return f"failed: {reason}"
    return "aborted by the peer" if getattr(assoc, "is_aborted", False) else "not established"
