"""Security of switchml's control channels (docs/security.md): the cluster secret, the CurveZMQ
keys derived from it, and the TLS files of P4Runtime.

Control channel (ZeroMQ, controller <-> workers): one cluster secret, shared by the
controller and every rank, authenticates and encrypts it with CurveZMQ (libzmq's
Curve25519 handshake; pyzmq's ``zmq.auth`` checks client keys). Both key pairs are derived
from the secret, so a rank needs nothing but the secret: the server key pair from
BLAKE2b(secret, person="switchml-server"), the client key pair from person="switchml-client",
each public key by ``zmq.curve_public``. The controller admits only the derived client key.
No cryptography is implemented here: BLAKE2b is hashlib's, Curve25519 libzmq's.

The secret comes from ``--secret-file FILE`` of a command, else ``$SWITCHML_SECRET`` (the text),
else ``$SWITCHML_SECRET_FILE`` (a path); launchers set those variables for every rank.

P4Runtime (gRPC): TLS with a server certificate, optionally mutual (client certificates),
through grpc's own credentials; ``TLSFiles`` names the PEM files and reads them with errors
that name the flag.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.utils import z85

from switchml import defaults

log = logging.getLogger(__name__)

#: The ZAP domain of the controller's socket (pyzmq's authenticator matches it exactly).
ZAP_DOMAIN = "switchml"
#: Socket-monitor events of a failed CurveZMQ handshake (a wrong or missing key, either side).
HANDSHAKE_FAILED_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                           | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
_SERVER_LABEL = b"switchml-server"
_CLIENT_LABEL = b"switchml-client"


class SecretError(ValueError):
    """The cluster secret is missing, unreadable or too short; the text names where it came from."""


def read_secret(secret_file: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None) -> bytes | None:
    """The cluster secret: from ``secret_file``, else ``$SWITCHML_SECRET``, else ``$SWITCHML_SECRET_FILE``;
    None when none is set. Surrounding whitespace (a file's newline) is not part of it.

    Raises:
        SecretError: the file cannot be read, or the secret is shorter than
            ``defaults.SECRET_MIN_BYTES``.
    """
    environ = os.environ if environ is None else environ
    if secret_file is not None:
        return _from_file(secret_file, "--secret-file")
    if environ.get(defaults.SECRET_ENV):
        return _checked(environ[defaults.SECRET_ENV].strip().encode(), f"${defaults.SECRET_ENV}")
    if environ.get(defaults.SECRET_FILE_ENV):
        return _from_file(environ[defaults.SECRET_FILE_ENV], f"${defaults.SECRET_FILE_ENV}")
    return None


def _from_file(path: str | os.PathLike, where: str) -> bytes:
    try:
        text = Path(path).read_bytes()
    except OSError as exc:
        raise SecretError(f"{where}={str(path)!r}: cannot read the cluster secret: {exc.strerror or exc}") from None
    return _checked(text.strip(), f"{where}={str(path)!r}")


def _checked(secret: bytes, where: str) -> bytes:
    if len(secret) < defaults.SECRET_MIN_BYTES:
        raise SecretError(f"{where}: the cluster secret is {len(secret)} bytes; expected at least "
                          f"{defaults.SECRET_MIN_BYTES} (make one: head -c 32 /dev/urandom | base64 > FILE)")
    return secret


def secret_env(secret: bytes) -> dict[str, str]:
    """The environment that hands ``secret`` to a child process (a rank, a switch)."""
    return {defaults.SECRET_ENV: secret.decode()}


@dataclass(frozen=True)
class CurveKeys:
    """The control channel's CurveZMQ key pairs (Z85 text), all derived from one cluster secret."""

    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes

    @classmethod
    def from_secret(cls, secret: bytes) -> CurveKeys:
        """Derive both key pairs; the same secret gives the same keys on every host."""
        server_public, server_secret = _key_pair(secret, _SERVER_LABEL)
        client_public, client_secret = _key_pair(secret, _CLIENT_LABEL)
        return cls(server_public, server_secret, client_public, client_secret)

    def secure_client(self, sock: zmq.Socket) -> None:
        """Make ``sock`` (before it connects) a CurveZMQ client of the controller."""
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.client_public
        sock.curve_secretkey = self.client_secret

    def secure_server(self, sock: zmq.Socket) -> zmq.auth.thread.ThreadAuthenticator:
        """Make ``sock`` (before it binds) a CurveZMQ server that admits only this secret's client
        key; returns the running authenticator of its context (stop it after closing ``sock``).

        The authenticator binds the context's ZAP endpoint, one per context: give each
        server its own ``zmq.Context``."""
        from zmq.auth.thread import ThreadAuthenticator

        auth = ThreadAuthenticator(sock.context, log=logging.getLogger("switchml.security.zap"))
        auth.start()
        auth.configure_curve_callback(ZAP_DOMAIN, _ClientKeyCheck(self.client_public))
        sock.zap_domain = ZAP_DOMAIN.encode()
        sock.curve_server = True
        sock.curve_publickey = self.server_public
        sock.curve_secretkey = self.server_secret
        return auth


def _key_pair(secret: bytes, label: bytes) -> tuple[bytes, bytes]:
    # BLAKE2b with a personalisation string is a keyed, domain-separated KDF (RFC 7693);
    # libsodium clamps the 32 bytes into a Curve25519 scalar itself
    secret_key = z85.encode(hashlib.blake2b(secret, digest_size=32, person=label).digest())
    return zmq.curve_public(secret_key), secret_key


class _ClientKeyCheck:
    """pyzmq's CURVE credentials provider: admit the one client key; log every refusal."""

    def __init__(self, allowed: bytes) -> None:
        self.allowed = allowed

    def callback(self, domain: str, key: bytes) -> bool:
        if key == self.allowed:
            return True
        log.warning("refused a control connection whose CURVE key %s is not derived from this cluster's secret",
                    key.decode(errors="replace"))
        return False


def is_local_endpoint(endpoint: str) -> bool:
    """Whether only this host can reach a ZeroMQ bind endpoint: a loopback TCP address, ipc or inproc.

    ``tcp://*:PORT``, ``tcp://0.0.0.0:PORT`` and every other address are reachable from other hosts.
    """
    transport, sep, rest = endpoint.partition("://")
    if not sep:
        raise ValueError(f"endpoint {endpoint!r}: expected TRANSPORT://ADDRESS, e.g. tcp://127.0.0.1:48865")
    if transport in ("ipc", "inproc"):
        return True
    host = rest.rpartition(":")[0].strip("[]") or rest
    host = host.split(";")[-1]  # tcp://SOURCE;HOST:PORT binds HOST
    if host == "*":
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # an interface or host name: what it resolves to decides
        try:
            return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except (OSError, ValueError):
            return False


@dataclass(frozen=True)
class TLSFiles:
    """PEM files of one end of a TLS connection (P4Runtime's gRPC).

    As a server: ``cert`` and ``key`` are its identity, ``ca`` (optional) the authority its
    clients' certificates must chain to (mutual TLS: a client without one is refused).
    As a client: ``ca`` verifies the server's certificate, ``cert`` and ``key`` (optional)
    are the client certificate of mutual TLS, and ``server_name`` overrides the name the
    server's certificate is checked against (default: the host of the address dialled).
    ``flags`` names the command-line flags of each field, for error messages.
    """

    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    server_name: str | None = None
    flags: tuple[str, str, str] = ("--tls-cert", "--tls-key", "--tls-ca")

    def server_credentials(self) -> tuple[bytes, bytes, bytes | None]:
        """(certificate chain, private key, client CA or None), read; ``ValueError`` names a bad flag."""
        if not (self.cert and self.key):
            raise ValueError(f"TLS on a server needs both {self.flags[0]} and {self.flags[1]} "
                             f"(got {self.flags[0]}={self.cert!r}, {self.flags[1]}={self.key!r})")
        return (_read_pem(self.cert, self.flags[0]), _read_pem(self.key, self.flags[1]),
                _read_pem(self.ca, self.flags[2]) if self.ca else None)

    def client_credentials(self) -> tuple[bytes, bytes | None, bytes | None]:
        """(root CA, client certificate chain or None, client key or None), read."""
        if not self.ca:
            raise ValueError(f"TLS on a client needs {self.flags[2]}: the CA (or self-signed certificate) that "
                             "signed the server's certificate")
        if bool(self.cert) != bool(self.key):
            raise ValueError(f"a client certificate needs both {self.flags[0]} and {self.flags[1]} "
                             f"(got {self.flags[0]}={self.cert!r}, {self.flags[1]}={self.key!r})")
        return (_read_pem(self.ca, self.flags[2]), _read_pem(self.cert, self.flags[0]) if self.cert else None,
                _read_pem(self.key, self.flags[1]) if self.key else None)


def _read_pem(path: str, flag: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{flag}={path!r}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{flag}={path!r}: not a PEM file (no '-----BEGIN' line)")
    return data


__all__ = ["HANDSHAKE_FAILED_EVENTS", "CurveKeys", "SecretError", "TLSFiles", "ZAP_DOMAIN", "is_local_endpoint", "read_secret", "secret_env"]
