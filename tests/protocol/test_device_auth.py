"""The signed instruction of a device (protocol.device_auth): encoding, binding, signatures."""

from __future__ import annotations

import msgspec
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from protocol.device_auth import (
    DOMAIN,
    DeviceAuthError,
    check_accept_auth,
    check_prepare_auth,
    decode_instruction,
    encode_instruction,
    instruction,
    key_id,
    load_public_key,
    new_device_key,
    prepare_instruction,
    sec1,
    sign,
    verify_signature,
)
from protocol.messages import (
    Accept,
    Acceptance,
    DeviceProof,
    MessageType,
    Prepare,
    UserAuth,
    decode_body,
    encode_body,
)
from tests.protocol.factories import make_prepare

P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
TID = "01957a3c-0000-7000-8000-000000000001"
REL = "01957a3c-0000-7000-8000-000000000002"


def grant(**overrides: object) -> dict[str, object]:
    fields: dict[str, object] = {
        "node": "prov-13",
        "person": "p-7",
        "ids": {"transfer_id": TID, "relation_id": REL},
        "amount_fen": 100_000,
        "created_at_ms": 1_773_626_400_000,
    }
    fields.update(overrides)
    return fields


def test_the_encoding_is_the_domain_prefix_and_sorted_compact_json() -> None:
    what = instruction("grant.instruct", **grant())  # type: ignore[arg-type]
    assert encode_instruction(what) == DOMAIN + (
        b'{"action":"grant.instruct","amount_fen":100000,"created_at_ms":1773626400000,'
        b'"ids":{"relation_id":"' + REL.encode() + b'","transfer_id":"' + TID.encode() + b'"},'
        b'"node":"prov-13","person":"p-7","v":1}'
    )
    assert decode_instruction(encode_instruction(what)) == what


@pytest.mark.parametrize(
    "raw",
    [
        b'{"action":"grant.instruct"}',  # no prefix
        DOMAIN + b"not json",
        DOMAIN + b'{"v":1}',  # fields missing
        # Valid content in another key order, or with spaces: not canonical, refused.
        DOMAIN + b'{"v":1,"action":"grant.instruct","amount_fen":1,"created_at_ms":1,'
        b'"ids":{},"node":"n","person":"p"}',
        DOMAIN + b'{"action": "grant.instruct","amount_fen":1,"created_at_ms":1,'
        b'"ids":{},"node":"n","person":"p","v":1}',
        DOMAIN + b'{"action":"grant.steal","amount_fen":1,"created_at_ms":1,'
        b'"ids":{},"node":"n","person":"p","v":1}',
    ],
)
def test_anything_but_the_canonical_encoding_is_malformed(raw: bytes) -> None:
    with pytest.raises(DeviceAuthError) as refused:
        decode_instruction(raw)
    assert refused.value.reason == "malformed"


def test_signatures_verify_in_strict_der_and_high_s_is_accepted() -> None:
    key = new_device_key()
    point = sec1(key.public_key())
    signed, sig = sign(key, instruction("grant.instruct", **grant()))  # type: ignore[arg-type]
    verify_signature("ES256", point, sig, signed)
    # The other S of the same signature (phones do not normalise S): accepted, by design.
    r, s = decode_dss_signature(sig)
    verify_signature("ES256", point, encode_dss_signature(r, P256_ORDER - s), signed)
    with pytest.raises(DeviceAuthError) as refused:
        verify_signature("ES256", point, encode_dss_signature(r, (s + 1) % P256_ORDER), signed)
    assert refused.value.reason == "bad_signature"
    with pytest.raises(DeviceAuthError) as refused:
        verify_signature("ES256", point, sig + b"\x00", signed)  # trailing garbage: not DER
    assert refused.value.reason == "bad_der"
    with pytest.raises(DeviceAuthError) as refused:
        verify_signature("ES256", point, b"\x30\x00", signed)
    assert refused.value.reason == "bad_der"
    with pytest.raises(DeviceAuthError) as refused:
        verify_signature("ES384", point, sig, signed)
    assert refused.value.reason == "unsupported_alg"


def test_keys_must_be_p256_points_given_as_sec1_or_spki() -> None:
    key = new_device_key().public_key()
    spki = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert sec1(load_public_key("ES256", spki)) == sec1(key)
    assert sec1(load_public_key("ES256", sec1(key))) == sec1(key)
    other_curve = ec.generate_private_key(ec.SECP384R1()).public_key()
    for bad in (
        other_curve.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        b"\x04" + b"\x01" * 64,  # not on the curve
        b"junk",
    ):
        with pytest.raises(DeviceAuthError) as refused:
            load_public_key("ES256", bad)
        assert refused.value.reason == "bad_key"
    assert key_id(sec1(key)).startswith("dk_") and len(key_id(sec1(key))) == 25


def signed_prepare(
    key: ec.EllipticCurvePrivateKey, prepare: Prepare, **overrides: object
) -> Prepare:
    want = prepare_instruction(prepare)
    fields = {
        "node": want.node,
        "person": want.person,
        "ids": want.ids,
        "amount_fen": want.amount_fen,
        "created_at_ms": 1,
    }
    fields.update(overrides)
    signed, sig = sign(key, instruction("grant.instruct", **fields))  # type: ignore[arg-type]
    point = sec1(key.public_key())
    auth = UserAuth(
        method="device",
        verified_at_ms=2,
        ref=key_id(point),
        device=DeviceProof(
            kid=key_id(point), alg="ES256", public_key=point, sig=sig, signed=signed
        ),
    )
    return msgspec.structs.replace(prepare, user_auth=auth)


def test_b_checks_that_the_prepare_is_exactly_what_the_giver_signed() -> None:
    key = new_device_key()
    prepare = make_prepare()
    good = signed_prepare(key, prepare)
    check_prepare_auth(good, good.giver.node)
    # It travels: the canonical body round-trips with the proof inside.
    assert decode_body(MessageType.PREPARE, encode_body(good)) == good
    for changed, differs in (
        (msgspec.structs.replace(good, amount_fen=good.amount_fen + 1), ("amount_fen",)),
        (
            msgspec.structs.replace(
                good, relation=msgspec.structs.replace(good.relation, relation_id=REL)
            ),
            ("ids.relation_id",),
        ),
        (msgspec.structs.replace(good, transfer_id=TID), ("ids.transfer_id",)),
    ):
        with pytest.raises(DeviceAuthError) as refused:
            check_prepare_auth(changed, changed.giver.node)
        assert (refused.value.reason, refused.value.differs) == ("mismatch", differs)
    with pytest.raises(DeviceAuthError):
        check_prepare_auth(good, "prov-99")  # another node sends it
    # The proof's kid must be the key's digest.
    assert good.user_auth.device is not None
    wrong_kid = msgspec.structs.replace(
        good,
        user_auth=msgspec.structs.replace(
            good.user_auth,
            device=msgspec.structs.replace(good.user_auth.device, kid="dk_" + "A" * 22),
        ),
    )
    with pytest.raises(DeviceAuthError) as refused:
        check_prepare_auth(wrong_kid, good.giver.node)
    assert refused.value.reason == "kid_mismatch"
    # pin stays A's word; a device method without its proof is malformed.
    check_prepare_auth(prepare, prepare.giver.node)
    no_proof = msgspec.structs.replace(
        good, user_auth=msgspec.structs.replace(good.user_auth, device=None)
    )
    with pytest.raises(DeviceAuthError) as refused:
        check_prepare_auth(no_proof, good.giver.node)
    assert refused.value.reason == "malformed"


def test_a_pin_user_auth_encodes_exactly_as_before_device_keys() -> None:
    """omit_defaults: PREPAREs stored before 0008 stay canonical (their hashes unchanged)."""
    auth = UserAuth(method="pin", verified_at_ms=5, ref="pin-1")
    assert msgspec.msgpack.encode(auth) == msgspec.msgpack.encode(
        {"method": "pin", "verified_at_ms": 5, "ref": "pin-1"}
    )
    acceptance = Acceptance(method="face", ref="face-9")
    assert msgspec.msgpack.encode(acceptance) == msgspec.msgpack.encode(
        {"method": "face", "ref": "face-9"}
    )


def test_a_checks_the_receivers_signed_acceptance() -> None:
    key = new_device_key()
    prepare = make_prepare()
    point = sec1(key.public_key())
    what = instruction(
        "grant.accept",
        node="prov-31",
        person=prepare.receiver.account_id,
        ids={"transfer_id": prepare.transfer_id},
        amount_fen=prepare.amount_fen,
        created_at_ms=1,
    )
    signed, sig = sign(key, what)
    proof = DeviceProof(kid=key_id(point), alg="ES256", public_key=point, sig=sig, signed=signed)
    accept = Accept(
        transfer_id=prepare.transfer_id,
        prepare_hash="0" * 64,
        b_hold_id=TID,
        accepted_at_ms=2,
        acceptance=Acceptance(method="device", ref=key_id(point), device=proof),
    )
    check_accept_auth(accept, prepare, "prov-31")
    with pytest.raises(DeviceAuthError) as refused:
        check_accept_auth(accept, prepare, "prov-44")
    assert refused.value.differs == ("node",)
    bigger = msgspec.structs.replace(prepare, amount_fen=prepare.amount_fen * 2)
    with pytest.raises(DeviceAuthError) as refused:
        check_accept_auth(accept, bigger, "prov-31")
    assert refused.value.differs == ("amount_fen",)
