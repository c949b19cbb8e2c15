"""Node-to-node surface (PLT/1): no app, institution or operator credential reaches it.

Authentication is the envelope signature: each envelope is verified against the sender's
key set, pinned through the peer directory, before anything else happens. The HTTP status
only says "received" (PROTOCOL b.4); business results are the signed replies. Malformed
input is a 400 problem (outer batch unreadable) or a signed ERROR in its position, never a
500.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.params import FromPath, HeaderParameter

from protocol.envelope import Wire, encode_envelope
from protocol.errors import ErrorCode as PltCode
from protocol.errors import MalformedMessage
from protocol.messages import MessageType
from wallet.api.auth import context_of
from wallet.context import WalletContext
from wallet.errors import ErrorCode, WalletError
from wallet.plt import inbox
from wallet.plt.node import PltNode
from wallet.plt.transport import CONTENT_TYPES, wire_of

# 256 envelopes of a few hundred bytes each are far below this; a STATUS with stored
# decisions stays below it too (protocol.envelope.BODY_BYTES_MAX is per body).
MESSAGES_BODY_BYTES_MAX = 4 * 1024 * 1024
ENVELOPE_BODY_BYTES_MAX = 1024 * 1024 + 4096
ENVELOPE_HEADER = "PLT-Envelope"


def _node(ctx: WalletContext) -> PltNode:
    if ctx.plt is None:
        raise WalletError(
            ErrorCode.SERVICE_UNAVAILABLE, "this node has no PLT/1 keys; it takes no messages"
        )
    return ctx.plt


def _malformed(detail: str) -> WalletError:
    return WalletError(ErrorCode.INVALID_REQUEST, detail, plt_code=int(PltCode.MALFORMED))


def _request_wire(request: Request[Any, Any, Any]) -> Wire:
    wire = wire_of(request.headers.get("content-type"))
    if wire is None:
        raise _malformed("send Content-Type application/msgpack or application/json")
    return wire


def _reply_wire(request: Request[Any, Any, Any], default: Wire) -> Wire:
    accepted = wire_of(request.headers.get("accept"))
    return accepted or default


class PltController(Controller):
    path = "/plt/v1"
    tags = ["plt: node to node"]

    @post(
        "/messages",
        operation_id="pltMessages",
        status_code=200,
        request_max_body_size=MESSAGES_BODY_BYTES_MAX,
    )
    async def messages(self, request: Request[Any, Any, Any]) -> Response[bytes]:
        """A batch of at most 256 signed envelopes (msgpack or JSON, per Content-Type).

        The answer is a batch of signed replies in the same encoding; reply i answers
        envelope i. A refused envelope gets a signed ERROR (3101 malformed, 3105 signature,
        3100 wrong recipient, 3106 modified, 3208 unknown transfer, 2003 try again) and
        changes nothing. An unreadable batch or one longer than 256 is a 400 problem with
        `plt_code` 3101.
        """
        ctx = context_of(request)
        node = _node(ctx)
        wire = _request_wire(request)
        raw = await request.body()
        try:
            replies = await inbox.receive_batch(ctx, node, raw, wire)
        except MalformedMessage as exc:
            raise _malformed(exc.message) from None
        return Response(replies, media_type=CONTENT_TYPES[wire])

    @get("/keyset", operation_id="pltKeyset")
    async def keyset(self, request: Request[Any, Any, Any]) -> Response[bytes]:
        """This node's key set document, signed by its root key (PROTOCOL b.11).

        Peers verify it against the root key pinned in their directory, and fetch it again
        when an envelope names a key id they do not know.
        """
        node = _node(context_of(request))
        return Response(msgspec.json.encode(node.keys.document), media_type=CONTENT_TYPES["json"])

    @get("/transfers/{transfer_id:str}", operation_id="pltTransferStatus")
    async def transfer_status(
        self,
        request: Request[Any, Any, Any],
        transfer_id: FromPath[str],
        plt_envelope: Annotated[
            str,
            HeaderParameter(name=ENVELOPE_HEADER, min_length=1, max_length=8192),
        ],
    ) -> Response[bytes]:
        """The state of one transfer, as a signed STATUS envelope (PROTOCOL b.4).

        The request is authenticated like any PLT/1 message: header `PLT-Envelope` carries
        a signed STATUS_REQ envelope (base64 of its msgpack or JSON form) asking about
        exactly this transfer. The answer is one signed envelope (STATUS, or ERROR),
        JSON unless `Accept: application/msgpack`.
        """
        ctx = context_of(request)
        node = _node(ctx)
        try:
            raw, wire = inbox.decode_header_envelope(plt_envelope)
        except MalformedMessage as exc:
            raise _malformed(exc.message) from None
        reply = await inbox.receive_one(
            ctx, node, raw, wire, only=MessageType.STATUS_REQ, transfer_id=transfer_id
        )
        out = _reply_wire(request, "json")
        return Response(encode_envelope(reply, out), media_type=CONTENT_TYPES[out])

    @post(
        "/status",
        operation_id="pltStatus",
        status_code=200,
        request_max_body_size=ENVELOPE_BODY_BYTES_MAX,
    )
    async def status(self, request: Request[Any, Any, Any]) -> Response[bytes]:
        """One signed STATUS_REQ envelope in; one signed STATUS (or ERROR) envelope out,
        in the same encoding. Answered by the grants feature; 3208 where it knows no transfer.
        """
        ctx = context_of(request)
        node = _node(ctx)
        wire = _request_wire(request)
        raw = await request.body()
        reply = await inbox.receive_one(ctx, node, raw, wire, only=MessageType.STATUS_REQ)
        return Response(encode_envelope(reply, wire), media_type=CONTENT_TYPES[wire])
