-- Cross-province relationships (RULES 5-8, DESIGN "Cross-province quota" step 1).
--
-- The giver files at the giver's node (side 'giver'); the receiver's node keeps its own row
-- (side 'receiver') for the same relation_id, a UUIDv7 made by the giver's node. The two rows
-- move through signed REL_* messages (PROTOCOL b.4, docs/plt-integration.md):
--
--   giver side:    requested --REL_CONFIRM--> active --either ends--> ended
--                  requested --REL_DECLINE--> declined
--                  requested --REL_REPLY REFUSED--> refused
--   receiver side: (REL_REQUEST) --checks pass--> pending_confirmation --confirm--> active
--                                --checks fail--> refused (tombstone, so a retry gets the same answer)
--                  pending_confirmation --decline--> declined
--                  (REL_END for an id never seen) --> ended (tombstone, so a late REQUEST is refused)
--
-- Invariants held here: one row per (side, relation_id); one live relationship per directed
-- pair on each side; an ended row says when and by whom; a row with a person names them.

CREATE TABLE cross_relationship (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    relation_id         text NOT NULL
                        CHECK (relation_id ~ '^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$'),
    side                text NOT NULL CHECK (side IN ('giver', 'receiver')),
    -- The other province's node (registry id, e.g. prov-31).
    peer_node           text NOT NULL CHECK (peer_node ~ '^[a-z0-9][a-z0-9-]{0,31}$'),
    -- Our party: the giver on the giver side, the receiver on the receiver side. NULL only
    -- for receiver-side tombstones of requests that matched nobody, or ends never requested.
    person_id           bigint REFERENCES insured_person (id),
    -- The other party as this node knows them. Giver side: the receiver's name and ID number
    -- as filed. Receiver side: the giver's masked name (the giver node never sends more).
    other_name          text CHECK (length(other_name) BETWEEN 1 AND 100),
    other_id_number     text CHECK (other_id_number ~ '^[0-9]{17}[0-9X]$'),
    -- Giver side: the receiver's wallet at the peer (from REL_CONFIRM), for PREPARE.
    -- Receiver side: the giver's account reference at the peer (from REL_REQUEST).
    other_ref           text CHECK (length(other_ref) BETWEEN 1 AND 128),
    -- Giver side: the receiver's province as filed (GB/T 2260).
    other_province      text CHECK (other_province ~ '^[0-9]{6}$'),
    relation_type       text CHECK (relation_type IN (
                            'spouse', 'parent', 'child', 'sibling',
                            'grandparent_paternal', 'grandparent_maternal',
                            'grandchild_paternal', 'grandchild_maternal')),
    evidence_ref        text CHECK (length(evidence_ref) BETWEEN 1 AND 128),
    state               text NOT NULL CHECK (state IN (
                            'requested', 'pending_confirmation', 'active',
                            'declined', 'refused', 'ended')),
    -- SHA-256 (hex) of the REL_REQUEST body bytes; REL_CONFIRM and REL_DECLINE echo it.
    request_hash        text CHECK (request_hash ~ '^[0-9a-f]{64}$'),
    -- Why the receiver's node refused the request (PLT/1 code: 3204, 5105, ...).
    refusal_code        integer CHECK (refusal_code BETWEEN 1000 AND 9999),
    refusal_text        text CHECK (length(refusal_text) <= 500),
    filed_at            timestamptz NOT NULL,
    -- Giver side: when the receiver's node confirmed receipt of the request.
    delivered_at        timestamptz,
    confirmed_at        timestamptz,
    declined_at         timestamptz,
    ended_at            timestamptz,
    ended_by            text CHECK (ended_by IN ('giver', 'receiver', 'system')),
    end_reason          text CHECK (length(end_reason) <= 500),
    UNIQUE (side, relation_id),
    CONSTRAINT cross_relationship_end_recorded CHECK ((state = 'ended') = (ended_at IS NOT NULL)),
    CONSTRAINT cross_relationship_refusal_recorded CHECK ((state = 'refused') = (refusal_code IS NOT NULL)),
    CONSTRAINT cross_relationship_giver_row_complete CHECK (
        side <> 'giver' OR (person_id IS NOT NULL AND other_name IS NOT NULL
                            AND other_id_number IS NOT NULL AND other_province IS NOT NULL
                            AND relation_type IS NOT NULL AND evidence_ref IS NOT NULL
                            AND request_hash IS NOT NULL)),
    CONSTRAINT cross_relationship_giver_states CHECK (
        side <> 'giver' OR state IN ('requested', 'active', 'declined', 'refused', 'ended')),
    CONSTRAINT cross_relationship_receiver_states CHECK (
        side <> 'receiver' OR state IN ('pending_confirmation', 'active', 'declined', 'refused', 'ended')),
    -- A live receiver-side row always names its receiver.
    CONSTRAINT cross_relationship_live_has_person CHECK (
        state NOT IN ('requested', 'pending_confirmation', 'active') OR person_id IS NOT NULL)
);
-- One live relationship per directed pair, on each side.
CREATE UNIQUE INDEX cross_relationship_live_giver_pair
    ON cross_relationship (person_id, other_id_number)
    WHERE side = 'giver' AND state IN ('requested', 'active');
CREATE UNIQUE INDEX cross_relationship_live_receiver_pair
    ON cross_relationship (peer_node, other_ref, person_id)
    WHERE side = 'receiver' AND state IN ('pending_confirmation', 'active');
CREATE INDEX cross_relationship_person ON cross_relationship (person_id, side, state);

-- Each REL_* message applied here, once per (relationship, typ), with the reply it got:
-- a duplicate gets the stored reply, the same id with another body gets 3106.
CREATE TABLE cross_relationship_message (
    relationship_id  bigint NOT NULL REFERENCES cross_relationship (id),
    typ              text NOT NULL CHECK (typ IN ('REL_REQUEST', 'REL_CONFIRM', 'REL_DECLINE', 'REL_END')),
    body             bytea NOT NULL,
    body_hash        text NOT NULL CHECK (body_hash ~ '^[0-9a-f]{64}$'),
    -- The canonical REL_REPLY body we answered with (re-sealed for a duplicate).
    reply            bytea NOT NULL,
    received_at      timestamptz NOT NULL,
    PRIMARY KEY (relationship_id, typ)
);
CREATE TRIGGER cross_relationship_message_immutable BEFORE UPDATE OR DELETE ON cross_relationship_message
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
