"""Real certificates made with ``cryptography``: two CAs, a gateway certificate for
localhost, 127.0.0.1 and flowserve-gateway (server and client auth, as the mutual-TLS
probes need), client certificates of either CA, and an encrypted key."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, key, issuer: x509.Name, issuer_key, *extensions) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1)))
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass(frozen=True)
class Pki:
    """PEM files: two CAs, the gateway's certificate and key (also encrypted), and client
    certificates and keys."""

    ca: Path
    other_ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_client_cert: Path
    other_client_key: Path
    encrypted_server_key: Path


def _write_ca(folder: Path, name: str):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _certificate(name, key, _name(name), key, (x509.BasicConstraints(ca=True, path_length=None), True))
    (folder / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def _write_leaf(folder: Path, name: str, ca, usages, *extensions) -> tuple[Path, Path]:
    """A certificate signed by ``ca`` (certificate, key) for ``usages``, and its key, as files."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _certificate(name, key, ca[0].subject, ca[1], (x509.BasicConstraints(ca=False, path_length=None), True),
                        (x509.ExtendedKeyUsage(usages), False), *extensions)
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def make_pki(folder: Path) -> Pki:
    """The files of :class:`Pki`, written in ``folder``."""
    ca, other_ca = _write_ca(folder, "ca"), _write_ca(folder, "other-ca")
    # The names of deploy/components/tls, and server and client auth as deploy/components/mtls
    # needs: its probes present the gateway's own certificate.
    names = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.DNSName("flowserve-gateway"),
                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    server = _write_leaf(folder, "gateway", ca, [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
                         (names, False))
    client = _write_leaf(folder, "client", ca, [ExtendedKeyUsageOID.CLIENT_AUTH])
    other_client = _write_leaf(folder, "other-client", other_ca, [ExtendedKeyUsageOID.CLIENT_AUTH])
    encrypted = folder / "gateway-encrypted.key"
    encrypted.write_bytes(serialization.load_pem_private_key(server[1].read_bytes(), None).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")))
    return Pki(folder / "ca.crt", folder / "other-ca.crt", *server, *client, *other_client, encrypted)
