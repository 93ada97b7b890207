"""The API's own TLS (TP_TLS_CERT and TP_TLS_KEY): one server context, built the same way when the
settings are validated at start and when `tp-api` serves, so a certificate that cannot be served
stops the process before it listens."""

from __future__ import annotations

import ssl
from pathlib import Path

# TLS 1.0 and 1.1 are deprecated (RFC 8996); 1.2 with forward-secret AEAD suites and 1.3 remain.
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


class TlsFileError(Exception):
    """A certificate or key that cannot be served; `which` is "cert" or "key"."""

    def __init__(self, which: str, problem: str) -> None:
        super().__init__(problem)
        self.which = which


def _no_passphrase() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    raise TlsFileError("key", "is encrypted: the API cannot ask for a passphrase; give it an unencrypted key "
                       "readable only by the service user")


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context for `cert` (PEM, the chain after the leaf) and its `key`: TLS 1.2 or newer,
    ECDHE with AEAD ciphers for 1.2, no compression, no renegotiation."""
    for which, path in (("cert", cert), ("key", key)):
        try:
            text = path.read_bytes()
        except OSError as exc:
            raise TlsFileError(which, f"cannot read {path} ({exc.strerror or exc})") from None
        marker = b"-----BEGIN CERTIFICATE-----" if which == "cert" else b"PRIVATE KEY-----"
        if marker not in text:
            raise TlsFileError(which, f"{path} is not a PEM {'certificate' if which == 'cert' else 'private key'}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        context.load_cert_chain(cert, key, password=_no_passphrase)
    except ssl.SSLError as exc:
        raise TlsFileError("key", f"{key} cannot be loaded with {cert} (not its key, or malformed: "
                           f"{exc.reason or exc})") from None
    return context
