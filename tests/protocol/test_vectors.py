"""Conformance vectors (PROTOCOL b.14): signed envelopes recomputed byte for byte.

`vectors/envelope_v1.json` is committed. Any change to body encoding, the signing input,
the signature or the wire forms makes these tests fail; another implementation of PLT/1
can check itself against the same file. To regenerate after a deliberate change (and say
why in the commit):

    python -m tests.protocol.test_vectors
"""

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from protocol.envelope import decode_envelope, encode_envelope, open_envelope, seal, signing_input
from protocol.errors import ErrorCode
from protocol.keys import (
    KeySetDocument,
    SigningKey,
    initial_keyset,
    open_keyset_document,
    sign_keyset,
)
from protocol.messages import (
    Body,
    ErrorBody,
    ErrorReply,
    MessageType,
    Outcome,
    decode_body,
    encode_body,
    hash_body,
)
from tests.protocol.factories import (
    T0_MS,
    A,
    B,
    fixed_id,
    make_accept,
    make_decision,
    make_decline,
    make_prepare,
)

VECTORS = Path(__file__).parent / "vectors" / "envelope_v1.json"

# RFC 8032 §7.1 TEST 1 and TEST 2 secret keys, so the public keys can be checked there too.
NODE_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
ROOT_SEED = bytes.fromhex("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb")
NODE_KEY = SigningKey.from_seed("prov-11/2026-03-1", NODE_SEED)
ROOT_KEY = SigningKey.from_seed("prov-11/root-1", ROOT_SEED)
KEYSET = initial_keyset(A, NODE_KEY, T0_MS - 86_400_000)

_PREPARE = make_prepare()
_ACCEPT = make_accept(_PREPARE)


def cases() -> list[tuple[str, MessageType, str, str, Body]]:
    """(name, typ, from, to, body) of every vector; A signs all of them with NODE_KEY."""
    commit = make_decision(_PREPARE, Outcome.COMMIT, vote_hash=hash_body(_ACCEPT))
    abort = make_decision(
        _PREPARE, Outcome.ABORT, reason=ErrorBody.of(ErrorCode.EXPIRED, "not accepted before 06:00")
    )
    error = ErrorReply(
        ref_typ=MessageType.PREPARE,
        ref_hash=hash_body(_PREPARE),
        transfer_id=_PREPARE.transfer_id,
        error=ErrorBody.of(ErrorCode.MODIFIED_REQUEST),
        differs=("amount_fen",),
    )
    return [
        ("prepare", MessageType.PREPARE, A, B, _PREPARE),
        ("accept", MessageType.ACCEPT, A, B, _ACCEPT),
        (
            "decline",
            MessageType.DECLINE,
            A,
            B,
            make_decline(_PREPARE, ErrorBody.of(ErrorCode.RECEIVER_DECLINED)),
        ),
        ("decision_commit", MessageType.DECISION, A, B, commit),
        ("decision_abort", MessageType.DECISION, A, B, abort),
        ("error_3106", MessageType.ERROR, A, B, error),
    ]


def compute() -> dict[str, Any]:
    """Every vector, computed from the code."""
    doc = sign_keyset(KEYSET, ROOT_KEY)
    out: dict[str, Any] = {
        "description": "PLT/1 envelope test vectors; see tests/protocol/test_vectors.py",
        "signing_key": {
            "kid": NODE_KEY.kid,
            "seed_hex": NODE_SEED.hex(),
            "ed25519_pub": NODE_KEY.public_b64,
        },
        "root_key": {
            "kid": ROOT_KEY.kid,
            "seed_hex": ROOT_SEED.hex(),
            "ed25519_pub": ROOT_KEY.public_b64,
        },
        "keyset_document": {
            "keyset_bytes_hex": doc.keyset_bytes.hex(),
            "root_kid": doc.root_kid,
            "sig_hex": doc.sig.hex(),
        },
        "cases": [],
    }
    for i, (name, typ, from_node, to_node, body) in enumerate(cases()):
        msg_id = fixed_id(1000 + i)
        created_at_ms = T0_MS + i
        env = seal(body, typ, from_node, to_node, NODE_KEY, created_at_ms, msg_id=msg_id)
        data = signing_input(
            v=1, typ=typ, msg_id=msg_id, from_node=from_node, to_node=to_node,
            kid=NODE_KEY.kid, created_at_ms=created_at_ms, body=env.body,
        )  # fmt: skip
        out["cases"].append(
            {
                "name": name,
                "typ": str(typ),
                "from_node": from_node,
                "to_node": to_node,
                "msg_id": msg_id,
                "created_at_ms": created_at_ms,
                "body_hex": env.body.hex(),
                "body_sha256_hex": hashlib.sha256(env.body).hexdigest(),
                "signing_input_hex": data.hex(),
                "sig_hex": env.sig.hex(),
                "envelope_json": encode_envelope(env, "json").decode(),
                "envelope_msgpack_hex": encode_envelope(env, "msgpack").hex(),
            }
        )
    return out


def stored() -> dict[str, Any]:
    result: dict[str, Any] = json.loads(VECTORS.read_text())
    return result


def write_vectors() -> None:
    """Regenerate the committed vectors: `python -m tests.protocol.test_vectors`."""
    VECTORS.parent.mkdir(exist_ok=True)
    VECTORS.write_text(json.dumps(compute(), indent=2, ensure_ascii=False) + "\n")


def test_public_keys_match_rfc_8032() -> None:
    assert NODE_KEY.sign(b"").hex().startswith("e5564300c360ac72")  # RFC 8032 TEST 1 signature
    keys = stored()
    assert keys["signing_key"]["ed25519_pub"] == "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
    assert keys["root_key"]["ed25519_pub"] == "PUAXw-hDiVqStwqnTRt-vJyYLM8uxJaMwM1V8Sr0Zgw"


def test_stored_vectors_equal_what_the_code_computes_byte_for_byte() -> None:
    expected, actual = stored(), compute()
    assert actual["keyset_document"] == expected["keyset_document"]
    assert len(actual["cases"]) == len(expected["cases"])
    for got, want in zip(actual["cases"], expected["cases"], strict=True):
        for field in want:
            assert got[field] == want[field], f"vector {want['name']}: {field} changed"


@pytest.mark.parametrize("case", range(6))
def test_stored_envelopes_open_with_the_stored_keyset(case: int) -> None:
    data = stored()
    doc_fields = data["keyset_document"]
    doc = KeySetDocument(
        keyset_bytes=bytes.fromhex(doc_fields["keyset_bytes_hex"]),
        root_kid=doc_fields["root_kid"],
        sig=bytes.fromhex(doc_fields["sig_hex"]),
    )
    keyset = open_keyset_document(
        doc, root_kid=ROOT_KEY.kid, root_pub=data["root_key"]["ed25519_pub"], expected_node=A
    )
    vector = data["cases"][case]
    name, typ, _, to_node, body = cases()[case]
    assert vector["name"] == name
    for raw in (vector["envelope_json"].encode(), bytes.fromhex(vector["envelope_msgpack_hex"])):
        opened = open_envelope(
            raw, to_node, lambda node, kid, at: keyset.verifying_key(kid, at), T0_MS + 10
        )
        assert opened.body == body
        assert decode_envelope(raw).sig.hex() == vector["sig_hex"]
    assert decode_body(typ, bytes.fromhex(vector["body_hex"])) == body
    assert encode_body(body).hex() == vector["body_hex"]


if __name__ == "__main__":
    write_vectors()
