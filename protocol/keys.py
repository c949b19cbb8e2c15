"""Ed25519 node keys, key sets and their rotation (PROTOCOL b.11).

A node signs every envelope with its current node key. It publishes the public halves as a
`KeySet` (node, seq, keys), wrapped in a `KeySetDocument` signed by the node's offline root
key (self-signed in this first version; the root's public key is pinned in the peer
directory). Peers verify an envelope against the sender's keyset *at the time they received
it*: a key is refused after its `not_after` and from its `revoked_at` on. `not_before` tells
the owner when to start signing with a new key; verifiers do not enforce it, so clock skew
between nodes cannot reject a freshly rotated key that the root already published.

Times are integer milliseconds since the Unix epoch, UTC. Key ids look like
`prov-13/2026-11-1`: node, UTC year-month of creation, a counter within that month.
"""

import base64
import functools
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Annotated, Self

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from protocol.errors import BadKeySet, ExpiredKey, RevokedKey, UnknownKey

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
KEY_ACTIVATION_DELAY_MS = DAY_MS  # publish a new key this long before signing with it
KEY_RETIREMENT_DELAY_MS = 7 * DAY_MS  # old keys stay valid for verification this long
KEYS_PER_SET_MAX = 64  # a limit on everything: a keyset is small

NODE_PATTERN = r"^[a-z0-9][a-z0-9-]{0,31}$"
KID_PATTERN = r"^[a-z0-9][a-z0-9-]{0,31}/[A-Za-z0-9._-]{1,32}$"
B64URL_KEY_PATTERN = r"^[A-Za-z0-9_-]{43}$"  # 32 bytes, unpadded base64url

NodeId = Annotated[str, msgspec.Meta(pattern=NODE_PATTERN)]
KeyId = Annotated[str, msgspec.Meta(pattern=KID_PATTERN)]
# Up to the last millisecond of year 9999 UTC (protocol.messages.TIME_MS_MAX): a later
# time has no date in Python or PostgreSQL.
TimeMs = Annotated[int, msgspec.Meta(ge=0, le=253_402_300_799_999)]

# Domain separation: a keyset signature can never be mistaken for an envelope signature,
# whose signing input starts with b"PLT/1\0".
KEYSET_SIGNING_PREFIX = b"PLT/1 KEYSET\0"
_PEM_KID_HEADER = b"PLT-Key-Id: "


def b64url_encode(raw: bytes) -> str:
    """Unpadded base64url (RFC 4648 §5), the form of public keys in a keyset."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Inverse of `b64url_encode`; accepts missing padding."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def node_of_kid(kid: str) -> str:
    """The node part of a key id (`prov-13/2026-11-1` -> `prov-13`)."""
    return kid.split("/", 1)[0]


def new_kid(node: str, now_ms: int, existing: Iterable[str] = ()) -> str:
    """Next key id for `node` in the UTC month of `now_ms`, after those in `existing`."""
    month = datetime.fromtimestamp(now_ms / 1000, tz=UTC).strftime("%Y-%m")
    prefix = f"{node}/{month}-"
    used = [int(k[len(prefix) :]) for k in existing if re.fullmatch(re.escape(prefix) + r"\d+", k)]
    return f"{prefix}{max(used, default=0) + 1}"


class SigningKey:
    """A private Ed25519 key together with the key id it is published under."""

    __slots__ = ("_private", "kid", "public_b64")

    def __init__(self, kid: str, private: Ed25519PrivateKey) -> None:
        if re.fullmatch(KID_PATTERN, kid) is None:
            raise ValueError(f"bad key id {kid!r}")
        self.kid = kid
        self._private = private
        self.public_b64 = b64url_encode(private.public_key().public_bytes_raw())

    @classmethod
    def generate(cls, kid: str) -> Self:
        """A fresh random key."""
        return cls(kid, Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, kid: str, seed: bytes) -> Self:
        """The key whose 32-byte private seed is `seed` (test vectors, HSM exports)."""
        return cls(kid, Ed25519PrivateKey.from_private_bytes(seed))

    @property
    def node(self) -> str:
        """The node this key belongs to."""
        return node_of_kid(self.kid)

    @property
    def seed(self) -> bytes:
        """The 32-byte private seed. Handle as a secret."""
        return self._private.private_bytes_raw()

    def sign(self, data: bytes) -> bytes:
        """Ed25519 signature (64 bytes, deterministic) over `data`."""
        return self._private.sign(data)

    def record(self, not_before_ms: int, not_after_ms: int | None = None) -> "KeyRecord":
        """The public `KeyRecord` of this key for a keyset."""
        return KeyRecord(
            kid=self.kid,
            ed25519_pub=self.public_b64,
            not_before_ms=not_before_ms,
            not_after_ms=not_after_ms,
        )

    def to_pem(self) -> bytes:
        """PKCS#8 PEM, preceded by a `PLT-Key-Id:` line (PEM parsers skip text before BEGIN)."""
        pem = self._private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return _PEM_KID_HEADER + self.kid.encode("ascii") + b"\n" + pem

    @classmethod
    def from_pem(cls, pem: bytes, kid: str | None = None) -> Self:
        """Load a key written by `to_pem` (or any Ed25519 PKCS#8 PEM when `kid` is given)."""
        if kid is None:
            first = pem.split(b"\n", 1)[0]
            if not first.startswith(_PEM_KID_HEADER):
                raise ValueError("PEM has no PLT-Key-Id line; pass kid=")
            kid = first[len(_PEM_KID_HEADER) :].strip().decode("ascii")
        private = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(private, Ed25519PrivateKey):
            raise ValueError("PEM does not hold an Ed25519 private key")
        return cls(kid, private)

    def __repr__(self) -> str:
        return f"SigningKey(kid={self.kid!r}, public={self.public_b64!r})"


class KeyRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One public node key in a keyset, with its validity window (ms since epoch, UTC)."""

    kid: KeyId
    ed25519_pub: Annotated[str, msgspec.Meta(pattern=B64URL_KEY_PATTERN)]
    not_before_ms: TimeMs
    not_after_ms: TimeMs | None = None
    revoked_at_ms: TimeMs | None = None

    def usable_at(self, at_ms: int) -> bool:
        """Not expired and not revoked at `at_ms` (`not_before_ms` is not checked)."""
        if self.revoked_at_ms is not None and at_ms >= self.revoked_at_ms:
            return False
        return self.not_after_ms is None or at_ms <= self.not_after_ms


class KeySet(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Every public key a node ever published; `seq` grows with each change."""

    node: NodeId
    seq: Annotated[int, msgspec.Meta(ge=1)]
    keys: Annotated[tuple[KeyRecord, ...], msgspec.Meta(max_length=KEYS_PER_SET_MAX)]

    def __post_init__(self) -> None:
        kids = [k.kid for k in self.keys]
        if len(set(kids)) != len(kids):
            raise ValueError("duplicate kid in keyset")
        for kid in kids:
            if node_of_kid(kid) != self.node:
                raise ValueError(f"kid {kid!r} does not belong to node {self.node!r}")

    def record(self, kid: str) -> KeyRecord:
        """The record of `kid`, or UnknownKey."""
        for rec in self.keys:
            if rec.kid == kid:
                return rec
        raise UnknownKey(
            f"{self.node} keyset seq {self.seq} has no key {kid!r}", node=self.node, kid=kid
        )

    def verifying_key(self, kid: str, at_ms: int) -> Ed25519PublicKey:
        """Public key of `kid` for a message received at `at_ms`.

        Raises UnknownKey (refresh this keyset once, then retry), RevokedKey when
        `at_ms >= revoked_at_ms`, ExpiredKey when `at_ms > not_after_ms`.
        """
        rec = self.record(kid)
        if rec.revoked_at_ms is not None and at_ms >= rec.revoked_at_ms:
            raise RevokedKey(f"key {kid!r} revoked at {rec.revoked_at_ms}", node=self.node, kid=kid)
        if rec.not_after_ms is not None and at_ms > rec.not_after_ms:
            raise ExpiredKey(f"key {kid!r} expired at {rec.not_after_ms}", node=self.node, kid=kid)
        return public_key_from_b64(rec.ed25519_pub)

    def signing_kid(self, now_ms: int) -> str:
        """The key the owner signs with at `now_ms`: the newest one already active and usable."""
        active = [k for k in self.keys if k.not_before_ms <= now_ms and k.usable_at(now_ms)]
        if not active:
            raise UnknownKey(f"{self.node} has no usable key at {now_ms}", node=self.node)
        return max(active, key=lambda k: (k.not_before_ms, k.kid)).kid


class KeySetDocument(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A keyset as published (`GET /plt/v1/keyset`, typ KEYSET): the exact bytes and the root signature."""

    keyset_bytes: bytes
    root_kid: KeyId
    sig: bytes


_keyset_decoder = msgspec.msgpack.Decoder(KeySet)


@functools.lru_cache(maxsize=1024)
def public_key_from_b64(ed25519_pub: str) -> Ed25519PublicKey:
    """Load a base64url public key (cached: keys are few and verified often)."""
    return Ed25519PublicKey.from_public_bytes(b64url_decode(ed25519_pub))


def initial_keyset(node: str, key: SigningKey, now_ms: int) -> KeySet:
    """The first keyset of a node: one key, active from `now_ms`."""
    return KeySet(node=node, seq=1, keys=(key.record(not_before_ms=now_ms),))


def rotate_keyset(
    keyset: KeySet,
    new_key: SigningKey,
    now_ms: int,
    *,
    activate_after_ms: int = KEY_ACTIVATION_DELAY_MS,
    retire_after_ms: int = KEY_RETIREMENT_DELAY_MS,
) -> KeySet:
    """Add `new_key` (signing from now + activate_after) and retire the current keys.

    Every key without a `not_after` gets `now + retire_after`, which must leave the new key
    time to take over, so peers never face a node with no valid key.
    """
    if retire_after_ms <= activate_after_ms:
        raise ValueError("old keys must stay valid until after the new key is active")
    if new_key.node != keyset.node:
        raise ValueError(f"key {new_key.kid!r} is not for node {keyset.node!r}")
    retired = tuple(
        msgspec.structs.replace(k, not_after_ms=now_ms + retire_after_ms)
        if k.not_after_ms is None and k.revoked_at_ms is None
        else k
        for k in keyset.keys
    )
    added = new_key.record(not_before_ms=now_ms + activate_after_ms)
    return KeySet(node=keyset.node, seq=keyset.seq + 1, keys=(*retired, added))


def revoke_key(keyset: KeySet, kid: str, now_ms: int) -> KeySet:
    """Mark `kid` compromised from `now_ms` on; the record stays for checking old evidence."""
    keyset.record(kid)  # raises UnknownKey for a kid that is not there
    keys = tuple(
        msgspec.structs.replace(k, revoked_at_ms=now_ms) if k.kid == kid else k for k in keyset.keys
    )
    return KeySet(node=keyset.node, seq=keyset.seq + 1, keys=keys)


def sign_keyset(keyset: KeySet, root_key: SigningKey) -> KeySetDocument:
    """Encode `keyset` deterministically and sign it with the node's root key."""
    if root_key.node != keyset.node:
        raise ValueError(f"root key {root_key.kid!r} is not for node {keyset.node!r}")
    raw = msgspec.msgpack.encode(keyset, order="deterministic")
    return KeySetDocument(
        keyset_bytes=raw, root_kid=root_key.kid, sig=root_key.sign(KEYSET_SIGNING_PREFIX + raw)
    )


def open_keyset_document(
    doc: KeySetDocument, *, root_kid: str, root_pub: str, expected_node: str
) -> KeySet:
    """Verify `doc` against the pinned root key of `expected_node` and decode it.

    Raises BadKeySet when the root differs, the signature fails, the bytes do not decode,
    or the keyset is for another node.
    """
    if doc.root_kid != root_kid:
        raise BadKeySet(
            f"keyset signed by {doc.root_kid!r}, pinned root is {root_kid!r}", node=expected_node
        )
    try:
        public_key_from_b64(root_pub).verify(doc.sig, KEYSET_SIGNING_PREFIX + doc.keyset_bytes)
    except InvalidSignature:
        raise BadKeySet("keyset root signature does not verify", node=expected_node) from None
    try:
        keyset = _keyset_decoder.decode(doc.keyset_bytes)
    except (msgspec.DecodeError, ValueError) as exc:  # ValueError: bad UTF-8
        raise BadKeySet(f"keyset does not decode: {exc}", node=expected_node) from None
    if keyset.node != expected_node:
        raise BadKeySet(
            f"keyset is for {keyset.node!r}, expected {expected_node!r}", node=expected_node
        )
    return keyset
