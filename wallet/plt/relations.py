"""Cross-province relationships (RULES 5-8; DESIGN "Cross-province quota", step 1).

The giver files at the giver's node (A); A sends a signed REL_REQUEST to the node of the
relative's province (B, found through the peer directory, never through the ID number's
address code, RULES 22). B checks the receiver against its roster and answers REL_REPLY; the
receiver confirms or declines in their own app at B, which sends REL_CONFIRM or REL_DECLINE
back to A. Either party ends it at their own node, which sends REL_END to the other. A change
of insured status away from normal ends a person's relationships at their node (RULES 6).

    A (side 'giver')                                    B (side 'receiver')
    requested ---------- REL_REQUEST ---------------->  pending_confirmation | refused
              <--------- REL_REPLY OK | REFUSED -------   (3204 no open wallet, 5105 roster)
    refused   (on REFUSED)
    active    <--------- REL_CONFIRM -----------------  active        (receiver, password)
    declined  <--------- REL_DECLINE -----------------  declined      (receiver)
    ended     <-------- REL_END ---------------------->  ended         (either side, or status)

Every transition is a guarded UPDATE on a locked row, in the same transaction as the
outbox row of the message it causes and the audit event. Every received message is applied
once per (relationship, typ) and its reply stored (`cross_relationship_message`): a
duplicate gets the stored reply, the same relation id with another body gets 3106 and the
differing fields. A REL_END for a relation never seen leaves an `ended` tombstone, so a late
REL_REQUEST is refused instead of opening a relationship that its giver already ended.

When a relationship ends, the hooks in `ON_RELATION_ENDED` (receiver side, at B) and
`ON_GIVER_RELATION_ENDED` (giver side, at A) run inside the ending transaction: the grants
code closes unused quota there and queues RELEASE (RULES 7).

This module is the public surface; the code lives in

    relations_store      the rows: types, shared SQL, the stored replies (dedup), audit
    relations_lookup     a party's views (app) and the lookups the grants code uses
    relations_giver      A: filing, and applying B's REL_REPLY, REL_CONFIRM, REL_DECLINE
    relations_receiver   B: REL_REQUEST and the roster check, confirm and decline
    relations_ending     either side: ending by a party, a status change, the peer; hooks
    relations_messages   the `@handles` registration for REL_*; REL_REPLY routing

Importing it registers the REL_* handler with `dispatch` (through `relations_messages`).
"""

from __future__ import annotations

from wallet.plt.relations_ending import (
    ON_GIVER_RELATION_ENDED,
    ON_RELATION_ENDED,
    RelationEndedHook,
    end,
    end_cross_for_person,
)
from wallet.plt.relations_giver import file
from wallet.plt.relations_lookup import (
    active_for_receiver,
    active_relation_for_grant,
    get_for_person,
    list_for_person,
    receiver_side,
)
from wallet.plt.relations_messages import (
    REPLY_HOOKS,
    ReplyHook,
    on_rel_reply,
    on_relation_message,
)
from wallet.plt.relations_receiver import confirm, decline
from wallet.plt.relations_store import (
    LIVE_STATES,
    CrossRelation,
    CrossRelationshipView,
    CrossState,
    Refusal,
    Side,
    giver_account_ref,
    receiver_account_ref,
)

__all__ = [
    "LIVE_STATES",
    "ON_GIVER_RELATION_ENDED",
    "ON_RELATION_ENDED",
    "REPLY_HOOKS",
    "CrossRelation",
    "CrossRelationshipView",
    "CrossState",
    "Refusal",
    "RelationEndedHook",
    "ReplyHook",
    "Side",
    "active_for_receiver",
    "active_relation_for_grant",
    "confirm",
    "decline",
    "end",
    "end_cross_for_person",
    "file",
    "get_for_person",
    "giver_account_ref",
    "list_for_person",
    "on_rel_reply",
    "on_relation_message",
    "receiver_account_ref",
    "receiver_side",
]
