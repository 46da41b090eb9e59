"""DIMSE C-STORE destination: one association per batch, minimal contexts, optional TLS."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from pathlib import Path

from dicom_node.config import Config, DestinationConfig, TLSConfig
from dicom_node.delivery.base import SendOutcome, register
from dicom_node.errors import DeliveryError
from dicom_node.scu import store_files

log = logging.getLogger(__name__)


def tls_context(tls: TLSConfig) -> ssl.SSLContext | None:
    """Client TLS context for a destination, or None when TLS is off."""
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file) if tls.ca_file else None
    )
    if tls.cert_file and tls.key_file:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    return ctx


@register("dimse")
class DimseDestination:
    """A PACS reached with C-STORE (``scu.store_files``: TCP_NODELAY, one association)."""

    def __init__(self, dest: DestinationConfig, cfg: Config) -> None:
        self.name = dest.name
        self.dest = dest
        self.calling_aet = cfg.node.ae_title
        self.max_pdu = cfg.node.max_pdu or 131072
        self.timeout = cfg.delivery.timeout_seconds
        self._tls = tls_context(dest.tls)

    def send(self, paths: Sequence[Path]) -> SendOutcome:
        try:
            results = store_files(
                self.dest.host, self.dest.port, list(paths), calling_aet=self.calling_aet,
                called_aet=self.dest.ae_title, tls_context=self._tls, max_pdu=self.max_pdu,
                timeout=self.timeout,
            )
        except DeliveryError as exc:
            return SendOutcome(dict(exc.partial), error=str(exc), retryable=exc.retryable)
        except OSError as exc:
            return SendOutcome({}, error=f"{type(exc).__name__}: {exc}")
        return SendOutcome(dict(results))
