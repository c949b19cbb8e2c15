"""Secrets the node keeps: payment passwords (scrypt), and tokens stored only as hashes.

Session tokens, institution API keys, one-time passwords and payment codes are random,
shown once, and stored as SHA-256 digests: a leaked table does not let anyone act.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import secrets

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


def _scrypt(password: str, salt: bytes, n: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=SCRYPT_R, p=SCRYPT_P).derive(password.encode())


def hash_password_sync(password: str, n: int = DEFAULT_SCRYPT_N) -> str:
    salt = secrets.token_bytes(16)
    return f"scrypt${n}${_b64(salt)}${_b64(_scrypt(password, salt, n))}"


def verify_password_sync(password: str, stored: str) -> bool:
    scheme, n, salt, digest = stored.split("$")
    if scheme != "scrypt":
        raise ValueError(f"unknown password scheme {scheme}")
    return hmac.compare_digest(_scrypt(password, _unb64(salt), int(n)), _unb64(digest))


async def hash_password(password: str, n: int = DEFAULT_SCRYPT_N) -> str:
    """scrypt is deliberately slow: run it off the event loop."""
    return await asyncio.to_thread(hash_password_sync, password, n)


async def verify_password(password: str, stored: str) -> bool:
    return await asyncio.to_thread(verify_password_sync, password, stored)


def digest(secret: str) -> bytes:
    """SHA-256 of a high-entropy secret (token, API key, code): enough, since it is random."""
    return hashlib.sha256(secret.encode()).digest()


def new_token(prefix: str, nbytes: int = 32) -> str:
    """A random bearer secret with a readable prefix (`sess_`, `inst_`)."""
    return f"{prefix}_{secrets.token_urlsafe(nbytes)}"


def new_numeric_code(digits: int) -> str:
    return "".join(secrets.choice("0123456789") for _ in range(digits))
