"""Secrets the node keeps: payment passwords (scrypt), and tokens stored only as hashes.

Session tokens, institution API keys, one-time passwords and payment codes are random,
shown once, and stored as SHA-256 digests: a leaked table does not let anyone act.

A payment password is 6 digits: 10^6 values, which no KDF cost protects against whoever
holds the hashes. So the password is first keyed with the node's *pepper*, a random secret
kept in a file beside the PLT/1 keys (a vault in production), never in the database:
`scrypt(HMAC-SHA256(pepper, password), salt)`, stored as `scrypt-hmac$<pepper id>$n$salt$digest`.
A database dump alone then reveals nothing. Hashes from before the pepper (`scrypt$n$...`)
still verify and are upgraded on the next successful check (`wallet.payment_password`).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from wallet.errors import ErrorCode, WalletError

SCRYPT_R = 8
SCRYPT_P = 1
DEFAULT_SCRYPT_N = 2**14


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def check_payment_password_format(password: str) -> None:
    """A payment password is 6 digits, not all the same and not a straight run."""
    if len(password) != 6 or not password.isdigit() or not password.isascii():
        raise WalletError(ErrorCode.INVALID_REQUEST, "the payment password must be 6 digits")
    digits = [int(c) for c in password]
    steps = {b - a for a, b in itertools.pairwise(digits)}
    if steps in ({0}, {1}, {-1}):
        raise WalletError(
            ErrorCode.INVALID_REQUEST,
            "the payment password is too easy to guess (repeated or consecutive digits)",
        )


PEPPER_FILE = "password_pepper.key"
PEPPER_BYTES = 32


@dataclass(frozen=True)
class Pepper:
    """The node's password pepper. `id` (a digest prefix) is stored with each hash, so a
    hash made with another pepper is recognised instead of silently failing to match."""

    key: bytes

    @property
    def id(self) -> str:
        return hashlib.sha256(b"pepper-id\0" + self.key).hexdigest()[:12]


class PepperUnavailable(RuntimeError):
    """A stored hash needs a pepper this node does not hold (a missing or replaced file)."""


def create_pepper(path: str | os.PathLike[str]) -> Pepper:
    """Write a new pepper file (0600), refusing to overwrite one: losing it locks everyone."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(PEPPER_BYTES)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as out:
        out.write(_b64(key) + "\n")
    return Pepper(key)


def load_pepper(path: str | os.PathLike[str]) -> Pepper | None:
    """The pepper in `path`, or None if there is no such file."""
    try:
        text = Path(path).read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    key = _unb64(text)
    if len(key) != PEPPER_BYTES:
        raise ValueError(f"{path}: a pepper is {PEPPER_BYTES} bytes")
    return Pepper(key)


def _scrypt(secret: bytes, salt: bytes, n: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=SCRYPT_R, p=SCRYPT_P).derive(secret)


def _keyed(password: str, pepper: Pepper) -> bytes:
    return hmac.new(pepper.key, password.encode(), hashlib.sha256).digest()


def hash_password_sync(
    password: str, n: int = DEFAULT_SCRYPT_N, pepper: Pepper | None = None
) -> str:
    salt = secrets.token_bytes(16)
    if pepper is None:
        return f"scrypt${n}${_b64(salt)}${_b64(_scrypt(password.encode(), salt, n))}"
    derived = _scrypt(_keyed(password, pepper), salt, n)
    return f"scrypt-hmac${pepper.id}${n}${_b64(salt)}${_b64(derived)}"


def verify_password_sync(password: str, stored: str, pepper: Pepper | None = None) -> bool:
    parts = stored.split("$")
    if parts[0] == "scrypt" and len(parts) == 4:
        _, n, salt, digest = parts
        secret = password.encode()
    elif parts[0] == "scrypt-hmac" and len(parts) == 5:
        _, pepper_id, n, salt, digest = parts
        if pepper is None or pepper.id != pepper_id:
            raise PepperUnavailable(f"the hash needs pepper {pepper_id}, which this node lacks")
        secret = _keyed(password, pepper)
    else:
        raise ValueError(f"unknown password scheme {parts[0]}")
    return hmac.compare_digest(_scrypt(secret, _unb64(salt), int(n)), _unb64(digest))


def needs_upgrade(stored: str, pepper: Pepper | None) -> bool:
    """A hash to redo after a successful check: made before the pepper (or with an old one)."""
    return pepper is not None and not stored.startswith(f"scrypt-hmac${pepper.id}$")


async def hash_password(
    password: str, n: int = DEFAULT_SCRYPT_N, pepper: Pepper | None = None
) -> str:
    """scrypt is deliberately slow: run it off the event loop."""
    return await asyncio.to_thread(hash_password_sync, password, n, pepper)


async def verify_password(password: str, stored: str, pepper: Pepper | None = None) -> bool:
    return await asyncio.to_thread(verify_password_sync, password, stored, pepper)


def digest(secret: str) -> bytes:
    """SHA-256 of a high-entropy secret (token, API key, code): enough, since it is random."""
    return hashlib.sha256(secret.encode()).digest()


def new_token(prefix: str, nbytes: int = 32) -> str:
    """A random bearer secret with a readable prefix (`sess_`, `inst_`)."""
    return f"{prefix}_{secrets.token_urlsafe(nbytes)}"


def new_numeric_code(digits: int) -> str:
    return "".join(secrets.choice("0123456789") for _ in range(digits))
