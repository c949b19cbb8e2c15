"""Device signatures: what a person's phone signs, and how anyone checks it (PLT/1, b.3).

A wallet holder's phone keeps an ECDSA P-256 key in its secure hardware (Android Keystore,
iOS Secure Enclave); the PIN or a face check unlocks it, and the phone signs one canonical,
domain-separated encoding of exactly what the person authorises:

    signed = b"PLT1-DEVICE-AUTH\\0" + JSON({action, amount_fen, created_at_ms, ids, node,
                                            person, v})          (keys sorted, no spaces)

`node` is the node the person's wallet lives at, `person` their account reference there
(`p-<n>` as giver, `w-<n>` as receiver), `ids` the object ids the action names (a grant's
`transfer_id` and `relation_id`, ...), `amount_fen` the amount or null. Because every field
is inside the signature, a signature for one action, amount, relative or node verifies for
no other; the domain prefix keeps these bytes apart from every other signature in PLT/1.

Signatures are DER (what phones' keystores produce), in strict DER only. High-S signatures
are *accepted*: the secure hardware of phones does not normalise S, and nothing in PLT/1 is
keyed on signature bytes (idempotency is by `transfer_id` and the signed bytes), so the
malleability of S is harmless here. The key record names its algorithm (`ES256`) so another
curve (SM2) can be added without changing the wire.

Pure functions only: no I/O, nothing from `wallet/` or `nodes/`.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Annotated, Literal

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from protocol.messages import Accept, DeviceProof, Prepare

DOMAIN = b"PLT1-DEVICE-AUTH\x00"
ALG_ES256 = "ES256"
SEC1_POINT_LEN = 65  # 0x04 || X || Y on P-256

Action = Literal[
    "grant.instruct",
    "grant.accept",
    "grant.decline",
    "relation.file",
    "relation.confirm",
    "relation.end",
    "payment_code.issue",
]
ACTIONS: frozenset[str] = frozenset(Action.__args__)  # type: ignore[attr-defined]


class DeviceAuthError(ValueError):
    """A device signature that proves nothing; `reason` is a stable token for callers.

    reasons: malformed (not our canonical encoding), bad_key (not a P-256 point, wrong curve),
    unsupported_alg, bad_der, bad_signature, kid_mismatch, mismatch (signed another thing).
    """

    def __init__(self, reason: str, message: str, differs: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.reason = reason
        self.differs = differs


class SignedInstruction(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """What a device signs. `v` versions the layout."""

    v: Literal[1]
    action: Action
    node: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    person: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    ids: dict[
        Annotated[str, msgspec.Meta(max_length=32)], Annotated[str, msgspec.Meta(max_length=128)]
    ]
    amount_fen: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] | None
    created_at_ms: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


_DECODER = msgspec.json.Decoder(SignedInstruction)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def unb64url(text: str) -> bytes:
    """Strict unpadded-or-padded base64url; ValueError on anything else."""
    text = text.rstrip("=")
    if not text.replace("-", "").replace("_", "").isalnum() or not text.isascii():
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def encode_instruction(instruction: SignedInstruction) -> bytes:
    """The exact bytes a device signs for `instruction`."""
    return DOMAIN + msgspec.json.encode(instruction, order="sorted")


def instruction(
    action: Action,
    *,
    node: str,
    person: str,
    ids: dict[str, str],
    amount_fen: int | None,
    created_at_ms: int,
) -> SignedInstruction:
    return SignedInstruction(
        v=1,
        action=action,
        node=node,
        person=person,
        ids=dict(ids),
        amount_fen=amount_fen,
        created_at_ms=created_at_ms,
    )


def decode_instruction(signed: bytes) -> SignedInstruction:
    """The instruction in `signed`; `malformed` unless the bytes are exactly canonical."""
    if not signed.startswith(DOMAIN):
        raise DeviceAuthError("malformed", "the signed bytes lack the PLT1-DEVICE-AUTH prefix")
    try:
        decoded = _DECODER.decode(signed[len(DOMAIN) :])
    except msgspec.DecodeError as exc:
        raise DeviceAuthError("malformed", f"the signed instruction is not valid: {exc}") from None
    if encode_instruction(decoded) != signed:
        raise DeviceAuthError("malformed", "the signed instruction is not in canonical encoding")
    return decoded


def load_public_key(alg: str, data: bytes) -> ec.EllipticCurvePublicKey:
    """A P-256 public key from a SEC1 uncompressed point or an X.509 SubjectPublicKeyInfo."""
    if alg != ALG_ES256:
        raise DeviceAuthError("unsupported_alg", f"algorithm {alg!r} is not supported (ES256)")
    try:
        if len(data) == SEC1_POINT_LEN and data[0] == 4:
            return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), data)
        key = serialization.load_der_public_key(data)
    except (ValueError, TypeError):
        raise DeviceAuthError("bad_key", "the public key is not a P-256 point") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise DeviceAuthError("bad_key", "the public key is not on curve P-256 (secp256r1)")
    return key


def sec1(key: ec.EllipticCurvePublicKey) -> bytes:
    """The key as the 65-byte SEC1 uncompressed point (what PLT/1 carries and stores)."""
    return key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def key_id(public_point: bytes) -> str:
    """A device key's id: derived from the key, so a proof's kid is checked, never trusted."""
    return "dk_" + b64url(hashlib.sha256(public_point).digest()[:16])


def verify_signature(alg: str, public_point: bytes, sig: bytes, signed: bytes) -> None:
    """Raise DeviceAuthError unless `sig` is a strict-DER ES256 signature of `signed`."""
    key = load_public_key(alg, public_point)
    try:
        r, s = decode_dss_signature(sig)
    except ValueError:
        raise DeviceAuthError("bad_der", "the signature is not DER") from None
    if encode_dss_signature(r, s) != sig:
        raise DeviceAuthError("bad_der", "the signature is not strict DER")
    try:
        key.verify(sig, signed, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise DeviceAuthError("bad_signature", "the device signature does not verify") from None


def differences(got: SignedInstruction, want: SignedInstruction) -> tuple[str, ...]:
    """The fields of `got` that are not what is being authorised (created_at_ms aside)."""
    out = [
        name
        for name in ("action", "node", "person", "amount_fen")
        if getattr(got, name) != getattr(want, name)
    ]
    out.extend(
        f"ids.{k}"
        for k in sorted(set(got.ids) | set(want.ids))
        if got.ids.get(k) != want.ids.get(k)
    )
    return tuple(out)


def check_proof(proof: DeviceProof, want: SignedInstruction) -> SignedInstruction:
    """Verify `proof` and that it authorises `want` (its created_at_ms aside); return what it
    signed. The caller judges `created_at_ms` against its own clock and rules."""
    if key_id(proof.public_key) != proof.kid:
        raise DeviceAuthError("kid_mismatch", "the key id is not the digest of the public key")
    got = decode_instruction(proof.signed)
    differs = differences(got, want)
    if differs:
        raise DeviceAuthError(
            "mismatch", f"the device signed something else: {', '.join(differs)}", differs
        )
    verify_signature(proof.alg, proof.public_key, proof.sig, proof.signed)
    return got


def prepare_instruction(prepare: Prepare) -> SignedInstruction:
    """What the giver's device must have signed for this PREPARE (created_at_ms aside)."""
    return instruction(
        "grant.instruct",
        node=prepare.giver.node,
        person=prepare.giver.account_ref,
        ids={"relation_id": prepare.relation.relation_id, "transfer_id": prepare.transfer_id},
        amount_fen=prepare.amount_fen,
        created_at_ms=0,
    )


def acceptance_instruction(prepare: Prepare, receiver_node: str) -> SignedInstruction:
    """What the receiver's device must have signed to accept this grant at `receiver_node`."""
    return instruction(
        "grant.accept",
        node=receiver_node,
        person=prepare.receiver.account_id,
        ids={"transfer_id": prepare.transfer_id},
        amount_fen=prepare.amount_fen,
        created_at_ms=0,
    )


def check_prepare_auth(prepare: Prepare, from_node: str) -> None:
    """At B, before holding anything: a `device` user_auth must prove the giver signed exactly
    this grant. A `pin` record is A's word (counters, guardians) and carries no proof."""
    auth = prepare.user_auth
    if auth.method == "pin":
        if auth.device is not None:
            raise DeviceAuthError("malformed", "a pin user_auth carries no device proof")
        return
    if auth.device is None:
        raise DeviceAuthError("malformed", "a device user_auth must carry the device proof")
    if prepare.giver.node != from_node:
        raise DeviceAuthError("mismatch", "giver.node is not the sender", ("node",))
    # Freshness is A's judgement (its clock, its rule); B only checks what was signed.
    check_proof(auth.device, prepare_instruction(prepare))


def check_accept_auth(accept: Accept, prepare: Prepare, from_node: str) -> None:
    """At A: a `device` acceptance in B's ACCEPT must be the receiver's signature over
    accepting exactly this grant at B. `pin`/`face` are B's word."""
    acceptance = accept.acceptance
    if acceptance.method != "device":
        if acceptance.device is not None:
            raise DeviceAuthError("malformed", "only a device acceptance carries a device proof")
        return
    if acceptance.device is None:
        raise DeviceAuthError("malformed", "a device acceptance must carry the device proof")
    check_proof(acceptance.device, acceptance_instruction(prepare, from_node))


# --- the phone's side (the demo, the benchmark and tests sign the way a phone would) ------


def new_device_key() -> ec.EllipticCurvePrivateKey:
    """A P-256 key, as a phone's secure hardware would make (there it never leaves)."""
    return ec.generate_private_key(ec.SECP256R1())


def sign(private_key: ec.EllipticCurvePrivateKey, what: SignedInstruction) -> tuple[bytes, bytes]:
    """The signed bytes and the DER signature over them."""
    signed = encode_instruction(what)
    return signed, private_key.sign(signed, ec.ECDSA(hashes.SHA256()))
