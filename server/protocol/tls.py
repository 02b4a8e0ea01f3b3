"""TLS material read from PEM files and checked when loaded, so a wrong file stops the start
with its name rather than failing every handshake later; and :class:`ClientTLS`, how a
client checks the gateway (the gateway's own side is ``flowserve.server.gateway.tls``)."""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import grpc


def read_pem(path: Path, label: str, what: str) -> bytes:
    """The bytes of ``path``; ValueError unless it holds a PEM block whose label ends in ``label``."""
    data = Path(path).read_bytes()
    if not re.search(rb"-----BEGIN [A-Z ]*" + label.encode() + rb"-----", data):
        raise ValueError(f"{what} {path} holds no PEM {label} (a '-----BEGIN ...{label}-----' block)")
    return data


def _no_password() -> bytes:
    raise ValueError("the key is encrypted; gRPC needs an unencrypted PEM key")


def read_key_pair(cert: Path, key: Path) -> tuple[bytes, bytes]:
    """The certificate chain and private key of ``cert`` and ``key``, checked to belong together."""
    chain = read_pem(cert, "CERTIFICATE", "TLS certificate")
    private_key = read_pem(key, "PRIVATE KEY", "TLS key")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ValueError(f"TLS key {key} is not the key of certificate {cert}") from None
        raise ValueError(f"TLS certificate {cert} and key {key} do not load: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"TLS key {key}: {exc}") from None
    return chain, private_key


def require_pair(cert: Path | None, key: Path | None, what: str) -> None:
    if (cert is None) != (key is None):
        raise ValueError(f"{what} needs both a certificate and its key; got only the "
                         f"{'certificate' if key is None else 'key'}")


@dataclass(frozen=True)
class ClientTLS:
    """How a client checks the gateway and, for mutual TLS, proves itself.

    ``ca``: the CAs that may sign the gateway's certificate (None: gRPC's default roots, the
    public CAs that grpcio bundles or the file in env ``GRPC_DEFAULT_SSL_ROOTS_FILE_PATH``). ``cert_chain`` and ``key``: the client certificate for mutual TLS.
    ``server_name``: the name the gateway's certificate must carry, when it differs from the
    target's host (e.g. a probe on 127.0.0.1 of a certificate for the Service's name).
    """

    ca: bytes | None = None
    cert_chain: bytes | None = None
    key: bytes | None = field(default=None, repr=False)
    server_name: str | None = None

    @classmethod
    def from_files(cls, ca: Path | None = None, cert: Path | None = None, key: Path | None = None,
                   server_name: str | None = None) -> ClientTLS:
        """TLS from PEM files; ValueError names the file that is missing its part, holds no
        PEM, or does not match."""
        require_pair(cert, key, "a client certificate")
        chain, private_key = (None, None) if cert is None else read_key_pair(cert, key)
        roots = None if ca is None else read_pem(ca, "CERTIFICATE", "TLS CA")
        return cls(roots, chain, private_key, server_name)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.ca, self.key, self.cert_chain)

    def channel_options(self) -> list[tuple[str, str]]:
        return [] if self.server_name is None else [("grpc.ssl_target_name_override", self.server_name)]
