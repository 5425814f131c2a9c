"""The server's TLS: its certificate and key, mutual TLS, and rotation without a restart.

gRPC asks `CertificateFiles.fetch` for the certificate configuration at every TLS handshake
(`grpc.dynamic_ssl_server_credentials`). It compares the files' identities (inode, size, mtime)
with those it last loaded, three `stat` calls, and reads them again only when one changed, so a
certificate renewed in place (certbot, cert-manager's secret volume, a `mv` over the old file)
serves the next handshake. A set of files that does not load (a half-written key, a key of
another certificate) is refused with a warning and the previous one keeps serving.

Whether clients must present a certificate (mutual TLS) is fixed at start; the client CA rotates
like the rest.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

# (inode, size, mtime) of each file: what changes when a file is rewritten or replaced.
_Stamp = tuple[tuple[int, int, int], ...]


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server on this machine (127.0.0.0/8, ::1, localhost)."""
    if host.strip("[]") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name could resolve to anything; 0.0.0.0 and "" are every interface


def check_server_files(cert: str, key: str, client_ca: str = "") -> None:
    """Check that the files exist and that `key` is the key of `cert`.

    Raises:
        ValueError: a file is missing or unreadable, or the pair does not match; the message
            names the setting and the path.
    """
    for setting, path in (("tls_cert", cert), ("tls_key", key), ("tls_client_ca", client_ca)):
        if path and not os.access(path, os.R_OK):
            raise ValueError(f"{setting} {path}: not a readable file")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as err:
        raise ValueError(
            f"tls_cert {cert} and tls_key {key} do not load as a certificate and its key: {err}"
        ) from None
    if client_ca:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cafile=client_ca)
        except (ssl.SSLError, OSError) as err:
            raise ValueError(f"tls_client_ca {client_ca}: not PEM certificates: {err}") from None


class CertificateFiles:
    """The server's certificate, key and client CA as files, re-read when they change.

    Args:
        cert: PEM certificate chain.
        key: PEM private key of `cert`.
        client_ca: PEM CA(s) of accepted client certificates; "" for no mutual TLS.
    """

    def __init__(self, cert: str, key: str, client_ca: str = "") -> None:
        self.paths = [Path(cert), Path(key), *([Path(client_ca)] if client_ca else [])]
        self.client_ca = bool(client_ca)
        self.reloads = 0
        self._stamp = self._current_stamp()
        self.initial = self._load()

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that ask `fetch` for the configuration at every handshake."""
        return grpc.dynamic_ssl_server_credentials(
            self.initial, self.fetch, require_client_authentication=self.client_ca
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """The new configuration when a file changed since the last load; None keeps the old.

        Called by gRPC on its own threads, once per handshake; it must not raise.
        """
        try:
            stamp = self._current_stamp()
        except OSError as err:
            log.warning("TLS files not readable now (%s); serving the previous ones", err)
            return None
        if stamp == self._stamp:
            return None
        self._stamp = stamp  # tried once per change: a bad set is not re-read every handshake
        try:
            check_server_files(*(str(path) for path in self.paths))
            configuration = self._load()
        except (OSError, ValueError) as err:
            log.warning("TLS files changed but do not load (%s); serving the previous ones", err)
            return None
        self.reloads += 1
        log.info("TLS certificate reloaded from %s", self.paths[0])
        return configuration

    def _current_stamp(self) -> _Stamp:
        stats = [path.stat() for path in self.paths]
        return tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)

    def _load(self) -> grpc.ServerCertificateConfiguration:
        cert, key = self.paths[0].read_bytes(), self.paths[1].read_bytes()
        client_ca = self.paths[2].read_bytes() if self.client_ca else None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=client_ca)
