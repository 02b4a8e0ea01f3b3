"""The gateway's TLS: its certificate and key and, for mutual TLS, the client CAs."""

from __future__ import annotations

import ssl
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from flowserve.server.protocol.tls import read_key_pair, read_pem, require_pair


@dataclass(frozen=True)
class ServerTLS:
    """The gateway's certificate chain and key, and, for mutual TLS, the CAs whose client
    certificates it accepts (a client without such a certificate cannot connect)."""

    cert_chain: bytes
    key: bytes = field(repr=False)
    client_ca: bytes | None = None

    @classmethod
    def from_files(cls, cert: Path | None, key: Path | None, client_ca: Path | None = None) -> ServerTLS | None:
        """TLS from PEM files; None (plaintext) when no file is given. ValueError names the
        file that is missing its part, holds no PEM, or does not match."""
        if cert is None and key is None:
            if client_ca is not None:
                raise ValueError("a client CA (mutual TLS) needs the server's TLS certificate and key too")
            return None
        require_pair(cert, key, "TLS")
        chain, private_key = read_key_pair(cert, key)
        ca = None if client_ca is None else read_pem(client_ca, "CERTIFICATE", "client CA")
        return cls(chain, private_key, ca)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key, self.cert_chain)], root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )

    def ssl_context(self) -> ssl.SSLContext:
        """The same certificate, key and client CAs for the HTTP API (TLS 1.2 or newer)."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        # ssl loads a key pair only from files: a private directory that is gone once loaded.
        with tempfile.TemporaryDirectory() as directory:
            chain, key = Path(directory, "chain.pem"), Path(directory, "key.pem")
            chain.write_bytes(self.cert_chain)
            key.touch(mode=0o600)
            key.write_bytes(self.key)
            context.load_cert_chain(chain, key)
        if self.client_ca is not None:
            context.load_verify_locations(cadata=self.client_ca.decode())
            context.verify_mode = ssl.CERT_REQUIRED
        return context
