-- Cross-province quota grants (RULES 11-16, PROTOCOL b.1, b.5-b.10, DESIGN "Cross-province quota").
--
-- Node A (the giver's node) keeps one `grant_out` row per transfer it coordinates; node B
-- (the receiver's node) keeps one `grant_in` row per (from_node, transfer_id). Every signed
-- body a row depends on is stored as the exact canonical bytes (msgpack), so the pure state
-- machines of protocol/ can be rebuilt from a row and every hash can be recomputed.
--
-- Invariants held here, not only in Python:
--   * a grant's state and its ledger hold agree at every commit (deferred constraint
--     triggers): PREPARED_A / in doubt <=> the hold is unresolved, COMMITTED <=> posted,
--     ABORTED <=> voided (or no hold at all for a B-side tombstone);
--   * the hold is exactly the grant's amount, from the giver's own personal account (A) or
--     into the grant's own quota account (B);
--   * states only move forward: a decided row never changes its decision, a vote is never
--     replaced, identity columns never change;
--   * one pending grant per (giver, receiver node, receiver) pair (RULES 13);
--   * a RELEASE never gives back more than was granted, and only for committed grants.
--
-- Clearing accounts are ordinary ledger accounts named `due_to:<node>:<slot>` (A) and
-- `due_from:<node>:<slot>` (B), slot = hash(transfer_id) % 16 (hot-row split, PROTOCOL b.1),
-- opened on demand. A quota is a ledger account of kind 'quota' per committed grant.

-- A peer whose traffic is stopped until a human lifts the freeze (equivocation, PROTOCOL b.6).
CREATE TABLE peer_link (
    node       text PRIMARY KEY CHECK (node ~ '^[a-z0-9][a-z0-9-]{0,31}$'),
    frozen_at  timestamptz NOT NULL,
    reason     text NOT NULL CHECK (length(reason) BETWEEN 1 AND 500)
);

-- --- node A ---------------------------------------------------------------------------------

CREATE TABLE grant_out (
    transfer_id           text PRIMARY KEY
                          CHECK (transfer_id ~ '^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$'),
    -- SHA-256 of the client's instruction (transfer_id, giver, relation, amount): client dedup.
    request_hash          text NOT NULL CHECK (request_hash ~ '^[0-9a-f]{64}$'),
    relation_id           text NOT NULL CHECK (length(relation_id) = 36),
    giver_person_id       bigint NOT NULL REFERENCES insured_person (id),
    to_node               text NOT NULL CHECK (to_node ~ '^[a-z0-9][a-z0-9-]{0,31}$'),
    receiver_account_ref  text NOT NULL CHECK (length(receiver_account_ref) BETWEEN 1 AND 128),
    amount_fen            bigint NOT NULL CHECK (amount_fen > 0),
    state                 text NOT NULL CHECK (state IN ('PREPARED_A', 'COMMITTED', 'ABORTED', 'REJECTED')),
    reject_code           integer CHECK (reject_code BETWEEN 1000 AND 9999),
    -- The calendar day of the instruction in the province's timezone (RULES 13: 3 a day).
    local_day             date NOT NULL,
    decide_by             timestamptz NOT NULL,
    -- The hold: `hold_ref` is the a_hold_id sent in PREPARE, `hold_id` the ledger row.
    hold_ref              text NOT NULL CHECK (length(hold_ref) = 36),
    hold_id               bigint UNIQUE REFERENCES ledger_transfer (id),
    prepare               bytea NOT NULL,
    prepare_hash          text NOT NULL CHECK (prepare_hash ~ '^[0-9a-f]{64}$'),
    b_seen                boolean NOT NULL DEFAULT false,
    vote_typ              text CHECK (vote_typ IN ('ACCEPT', 'DECLINE')),
    vote                  bytea,
    vote_hash             text CHECK (vote_hash ~ '^[0-9a-f]{64}$'),
    decision              bytea,
    decision_hash         text CHECK (decision_hash ~ '^[0-9a-f]{64}$'),
    acked                 boolean NOT NULL DEFAULT false,
    window_id             text NOT NULL CHECK (window_id ~ '^\d{4}-\d{2}-\d{2}T\d{2}$'),
    -- What B released back (cumulative, RELEASE is per grant and monotone).
    released_fen          bigint NOT NULL DEFAULT 0 CHECK (released_fen >= 0),
    version               integer NOT NULL DEFAULT 0,
    created_at            timestamptz NOT NULL,
    decided_at            timestamptz,
    CONSTRAINT grant_out_hold_unless_rejected CHECK ((state = 'REJECTED') = (hold_id IS NULL)),
    CONSTRAINT grant_out_reject_code CHECK ((state = 'REJECTED') = (reject_code IS NOT NULL)),
    CONSTRAINT grant_out_decision CHECK (
        (state IN ('COMMITTED', 'ABORTED')) = (decision IS NOT NULL)
        AND (decision IS NULL) = (decision_hash IS NULL)
        AND (decision IS NULL) = (decided_at IS NULL)),
    CONSTRAINT grant_out_vote CHECK ((vote IS NULL) = (vote_typ IS NULL) AND (vote IS NULL) = (vote_hash IS NULL)),
    CONSTRAINT grant_out_commit_needs_accept CHECK (state <> 'COMMITTED' OR vote_typ = 'ACCEPT'),
    CONSTRAINT grant_out_acked_after_decision CHECK (NOT acked OR decision IS NOT NULL),
    CONSTRAINT grant_out_release CHECK (released_fen <= amount_fen AND (released_fen = 0 OR state = 'COMMITTED')),
    CONSTRAINT grant_out_deadline CHECK (decide_by > created_at)
);
-- RULES 13: no new grant on a pair while an earlier one on it is still pending.
CREATE UNIQUE INDEX grant_out_one_pending_per_pair ON grant_out (giver_person_id, to_node, receiver_account_ref)
    WHERE state = 'PREPARED_A';
-- The expiry sweeper (PROTOCOL b.12).
CREATE INDEX grant_out_due ON grant_out (state, decide_by) WHERE state = 'PREPARED_A';
-- RULES 13: grants per giver per calendar day.
CREATE INDEX grant_out_giver_day ON grant_out (giver_person_id, local_day);
CREATE INDEX grant_out_relation ON grant_out (relation_id);

-- RELEASEs received (A) and sent (B), idempotent on release_id.
CREATE TABLE grant_release (
    direction    text NOT NULL CHECK (direction IN ('in', 'out')),
    release_id   text NOT NULL CHECK (length(release_id) = 36),
    peer_node    text NOT NULL,
    relation_id  text NOT NULL,
    body         bytea NOT NULL,
    body_hash    text NOT NULL CHECK (body_hash ~ '^[0-9a-f]{64}$'),
    -- A: the REL_REPLY body answered, so a duplicate gets the same answer.
    reply        bytea,
    returned_fen bigint NOT NULL CHECK (returned_fen >= 0),
    created_at   timestamptz NOT NULL,
    PRIMARY KEY (direction, release_id)
);

-- --- node B ---------------------------------------------------------------------------------

CREATE TABLE grant_in (
    from_node           text NOT NULL CHECK (from_node ~ '^[a-z0-9][a-z0-9-]{0,31}$'),
    transfer_id         text NOT NULL
                        CHECK (transfer_id ~ '^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$'),
    state               text NOT NULL CHECK (state IN
                            ('PENDING_ACCEPT', 'ACCEPTED', 'DECLINED_PENDING', 'DECLINED', 'COMMITTED', 'ABORTED')),
    received_at         timestamptz NOT NULL,
    -- Known once a PREPARE arrived (an ABORT tombstone has none of these).
    relation_id         text,
    receiver_person_id  bigint REFERENCES insured_person (id),
    amount_fen          bigint CHECK (amount_fen > 0),
    -- B stops offering acceptance here (UI only: A's clock decides, PROTOCOL b.7).
    accept_by           timestamptz,
    prepare             bytea,
    prepare_hash        text CHECK (prepare_hash ~ '^[0-9a-f]{64}$'),
    prepare_reply_typ   text CHECK (prepare_reply_typ IN ('RECEIVED', 'DECLINE')),
    prepare_reply       bytea,
    vote_typ            text CHECK (vote_typ IN ('ACCEPT', 'DECLINE')),
    vote                bytea,
    vote_hash           text CHECK (vote_hash ~ '^[0-9a-f]{64}$'),
    decision            bytea,
    decision_hash       text CHECK (decision_hash ~ '^[0-9a-f]{64}$'),
    ack                 bytea,
    -- Equivocation evidence: decisions that contradict the applied one, kept forever.
    conflicting         bytea[] NOT NULL DEFAULT '{}',
    presumed_abort      boolean NOT NULL DEFAULT false,
    hold_ref            text CHECK (length(hold_ref) = 36),
    hold_id             bigint UNIQUE REFERENCES ledger_transfer (id),
    quota_account_id    bigint UNIQUE REFERENCES account (id),
    -- The in-doubt resolver's schedule (PROTOCOL b.7: back off to 5 min).
    next_status_at      timestamptz,
    status_attempts     integer NOT NULL DEFAULT 0 CHECK (status_attempts >= 0),
    version             integer NOT NULL DEFAULT 0,
    decided_at          timestamptz,
    PRIMARY KEY (from_node, transfer_id),
    CONSTRAINT grant_in_prepare CHECK (
        (prepare IS NULL) = (prepare_hash IS NULL)
        AND (prepare IS NULL) = (prepare_reply IS NULL)
        AND (prepare_reply IS NULL) = (prepare_reply_typ IS NULL)
        AND (prepare IS NULL) = (amount_fen IS NULL)),
    CONSTRAINT grant_in_tombstone CHECK (prepare IS NOT NULL OR state = 'ABORTED'),
    CONSTRAINT grant_in_vote CHECK ((vote IS NULL) = (vote_typ IS NULL) AND (vote IS NULL) = (vote_hash IS NULL)),
    CONSTRAINT grant_in_decision CHECK (
        (decision IS NULL) = (decision_hash IS NULL) AND (decision IS NULL) = (ack IS NULL)),
    -- A hold exists exactly when B answered RECEIVED; B never moves it without A's word.
    CONSTRAINT grant_in_hold CHECK (
        (hold_id IS NOT NULL) = (prepare_reply_typ IS NOT DISTINCT FROM 'RECEIVED')
        AND (hold_id IS NULL) = (quota_account_id IS NULL)),
    CONSTRAINT grant_in_in_doubt_undecided CHECK (
        state NOT IN ('PENDING_ACCEPT', 'ACCEPTED', 'DECLINED_PENDING')
        OR (decision IS NULL AND NOT presumed_abort AND hold_id IS NOT NULL)),
    CONSTRAINT grant_in_commit CHECK (
        state <> 'COMMITTED' OR (decision IS NOT NULL AND vote_typ = 'ACCEPT' AND hold_id IS NOT NULL)),
    CONSTRAINT grant_in_accepted_voted CHECK (state <> 'ACCEPTED' OR vote_typ = 'ACCEPT'),
    CONSTRAINT grant_in_declined_pending_voted CHECK (state <> 'DECLINED_PENDING' OR vote_typ = 'DECLINE'),
    CONSTRAINT grant_in_declined_no_hold CHECK (state <> 'DECLINED' OR hold_id IS NULL),
    CONSTRAINT grant_in_aborted_decided CHECK (state <> 'ABORTED' OR decision IS NOT NULL OR presumed_abort)
);
CREATE INDEX grant_in_in_doubt ON grant_in (next_status_at)
    WHERE state IN ('PENDING_ACCEPT', 'ACCEPTED', 'DECLINED_PENDING');
CREATE INDEX grant_in_receiver ON grant_in (receiver_person_id, received_at);
CREATE INDEX grant_in_relation ON grant_in (from_node, relation_id);

-- One quota per grant that B holds: pending until A commits, active (spendable) after,
-- void when A aborts, closed when the relationship ends (the unused part is released).
CREATE TABLE quota (
    account_id          bigint PRIMARY KEY REFERENCES account (id),
    from_node           text NOT NULL,
    transfer_id         text NOT NULL,
    relation_id         text NOT NULL,
    receiver_person_id  bigint NOT NULL REFERENCES insured_person (id),
    giver_masked_name   text NOT NULL CHECK (length(giver_masked_name) BETWEEN 1 AND 64),
    granted_fen         bigint NOT NULL CHECK (granted_fen > 0),
    state               text NOT NULL CHECK (state IN ('pending', 'active', 'void', 'closed')),
    -- Cumulative amount moved back to due_from and listed in RELEASEs (refunds after close add).
    released_fen        bigint NOT NULL DEFAULT 0 CHECK (released_fen >= 0 AND released_fen <= granted_fen),
    created_at          timestamptz NOT NULL,
    activated_at        timestamptz,
    closed_at           timestamptz,
    UNIQUE (from_node, transfer_id),
    FOREIGN KEY (from_node, transfer_id) REFERENCES grant_in (from_node, transfer_id),
    CONSTRAINT quota_closed CHECK ((state = 'closed') = (closed_at IS NOT NULL)),
    CONSTRAINT quota_released_only_closed CHECK (released_fen = 0 OR state = 'closed'),
    CONSTRAINT quota_activated CHECK (state NOT IN ('active', 'closed') OR activated_at IS NOT NULL)
);
CREATE INDEX quota_receiver_active ON quota (receiver_person_id, created_at) WHERE state = 'active';
CREATE INDEX quota_receiver ON quota (receiver_person_id, created_at);
CREATE INDEX quota_relation_open ON quota (from_node, relation_id) WHERE state IN ('pending', 'active');

-- --- invariants across tables ----------------------------------------------------------------

-- Identity never changes; states only move forward; a decision or vote, once stored, stays.
CREATE FUNCTION grant_out_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.transfer_id <> OLD.transfer_id OR NEW.request_hash <> OLD.request_hash
       OR NEW.giver_person_id <> OLD.giver_person_id OR NEW.amount_fen <> OLD.amount_fen
       OR NEW.prepare <> OLD.prepare OR NEW.to_node <> OLD.to_node
       OR NEW.hold_id IS DISTINCT FROM OLD.hold_id THEN
        RAISE EXCEPTION 'grant_out %: identity columns are immutable', OLD.transfer_id
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.state <> OLD.state AND OLD.state <> 'PREPARED_A' THEN
        RAISE EXCEPTION 'grant_out %: % is final', OLD.transfer_id, OLD.state
            USING ERRCODE = 'check_violation';
    END IF;
    IF (OLD.decision IS NOT NULL AND NEW.decision IS DISTINCT FROM OLD.decision)
       OR (OLD.vote IS NOT NULL AND NEW.vote IS DISTINCT FROM OLD.vote)
       OR (OLD.acked AND NOT NEW.acked) OR (OLD.b_seen AND NOT NEW.b_seen)
       OR NEW.released_fen < OLD.released_fen THEN
        RAISE EXCEPTION 'grant_out %: evidence is never replaced', OLD.transfer_id
            USING ERRCODE = 'check_violation';
    END IF;
    NEW.version := OLD.version + 1;
    RETURN NEW;
END;
$$;
CREATE TRIGGER grant_out_guard BEFORE UPDATE ON grant_out FOR EACH ROW EXECUTE FUNCTION grant_out_guard();
CREATE TRIGGER grant_out_no_delete BEFORE DELETE ON grant_out FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();

CREATE FUNCTION grant_in_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.from_node <> OLD.from_node OR NEW.transfer_id <> OLD.transfer_id
       OR (OLD.prepare IS NOT NULL AND NEW.prepare IS DISTINCT FROM OLD.prepare)
       OR (OLD.hold_id IS NOT NULL AND NEW.hold_id IS DISTINCT FROM OLD.hold_id) THEN
        RAISE EXCEPTION 'grant_in %/%: identity columns are immutable', OLD.from_node, OLD.transfer_id
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.state <> OLD.state AND OLD.state IN ('COMMITTED', 'ABORTED', 'DECLINED') THEN
        RAISE EXCEPTION 'grant_in %/%: % is final', OLD.from_node, OLD.transfer_id, OLD.state
            USING ERRCODE = 'check_violation';
    END IF;
    IF (OLD.decision IS NOT NULL AND NEW.decision IS DISTINCT FROM OLD.decision)
       OR (OLD.vote IS NOT NULL AND NEW.vote IS DISTINCT FROM OLD.vote)
       OR NOT (NEW.conflicting @> OLD.conflicting) THEN
        RAISE EXCEPTION 'grant_in %/%: evidence is never replaced', OLD.from_node, OLD.transfer_id
            USING ERRCODE = 'check_violation';
    END IF;
    NEW.version := OLD.version + 1;
    RETURN NEW;
END;
$$;
CREATE TRIGGER grant_in_guard BEFORE UPDATE ON grant_in FOR EACH ROW EXECUTE FUNCTION grant_in_guard();
CREATE TRIGGER grant_in_no_delete BEFORE DELETE ON grant_in FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();

-- At commit: the hold is the grant's amount on the right accounts, and resolved as the state says.
CREATE FUNCTION grant_hold_matches_state() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    hold ledger_transfer%ROWTYPE;
    resolution text;
    expected text;
BEGIN
    IF NEW.hold_id IS NULL THEN
        RETURN NULL;
    END IF;
    SELECT * INTO hold FROM ledger_transfer WHERE id = NEW.hold_id;
    SELECT phase INTO resolution FROM ledger_transfer WHERE pending_id = NEW.hold_id;
    IF hold.phase <> 'pending' OR hold.amount_fen <> NEW.amount_fen THEN
        RAISE EXCEPTION 'grant %: hold % is not a pending transfer of % fen', NEW.transfer_id, NEW.hold_id, NEW.amount_fen
            USING ERRCODE = 'check_violation';
    END IF;
    IF TG_TABLE_NAME = 'grant_out' THEN
        IF hold.debit_account_id IS DISTINCT FROM
           (SELECT personal_account_id FROM insured_person WHERE id = NEW.giver_person_id) THEN
            RAISE EXCEPTION 'grant %: hold is not on the giver''s personal account', NEW.transfer_id
                USING ERRCODE = 'check_violation';
        END IF;
        expected := CASE NEW.state WHEN 'COMMITTED' THEN 'post' WHEN 'ABORTED' THEN 'void' END;
    ELSE
        IF hold.credit_account_id IS DISTINCT FROM NEW.quota_account_id THEN
            RAISE EXCEPTION 'grant %: hold does not credit the grant''s quota', NEW.transfer_id
                USING ERRCODE = 'check_violation';
        END IF;
        expected := CASE NEW.state WHEN 'COMMITTED' THEN 'post' WHEN 'ABORTED' THEN 'void' END;
    END IF;
    IF resolution IS DISTINCT FROM expected THEN
        RAISE EXCEPTION 'grant % is % but its hold is %', NEW.transfer_id, NEW.state, coalesce(resolution, 'unresolved')
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END;
$$;
CREATE CONSTRAINT TRIGGER grant_out_hold_matches_state AFTER INSERT OR UPDATE ON grant_out
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION grant_hold_matches_state();
CREATE CONSTRAINT TRIGGER grant_in_hold_matches_state AFTER INSERT OR UPDATE ON grant_in
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION grant_hold_matches_state();

-- The other direction: posting or voiding a grant's hold is only ever done together with the
-- grant's own state change (checked at commit, when both are written).
CREATE FUNCTION grant_hold_resolution_matches() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    grant_state text;
BEGIN
    SELECT state INTO grant_state FROM grant_out WHERE hold_id = NEW.pending_id;
    IF NOT FOUND THEN
        SELECT state INTO grant_state FROM grant_in WHERE hold_id = NEW.pending_id;
        IF NOT FOUND THEN
            RETURN NULL;  -- not a grant's hold
        END IF;
    END IF;
    IF grant_state IS DISTINCT FROM (CASE NEW.phase WHEN 'post' THEN 'COMMITTED' ELSE 'ABORTED' END) THEN
        RAISE EXCEPTION 'hold % was %ed but its grant is %', NEW.pending_id, NEW.phase, grant_state
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END;
$$;
CREATE CONSTRAINT TRIGGER ledger_transfer_grant_hold AFTER INSERT ON ledger_transfer
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.pending_id IS NOT NULL)
    EXECUTE FUNCTION grant_hold_resolution_matches();

-- A quota's lifecycle follows its grant's: pending <=> in doubt, active/closed => COMMITTED,
-- void => ABORTED; and only forward.
CREATE FUNCTION quota_guard() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    grant_state text;
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.state <> OLD.state AND NOT (
        (OLD.state = 'pending' AND NEW.state IN ('active', 'void'))
        OR (OLD.state = 'active' AND NEW.state = 'closed')) THEN
        RAISE EXCEPTION 'quota %: % -> % is not allowed', OLD.account_id, OLD.state, NEW.state
            USING ERRCODE = 'check_violation';
    END IF;
    SELECT state INTO grant_state FROM grant_in WHERE from_node = NEW.from_node AND transfer_id = NEW.transfer_id;
    IF (NEW.state = 'pending' AND grant_state NOT IN ('PENDING_ACCEPT', 'ACCEPTED', 'DECLINED_PENDING'))
       OR (NEW.state IN ('active', 'closed') AND grant_state <> 'COMMITTED')
       OR (NEW.state = 'void' AND grant_state <> 'ABORTED') THEN
        RAISE EXCEPTION 'quota % is % but its grant is %', NEW.account_id, NEW.state, grant_state
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END;
$$;
CREATE CONSTRAINT TRIGGER quota_follows_grant AFTER INSERT OR UPDATE ON quota
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION quota_guard();
CREATE TRIGGER quota_no_delete BEFORE DELETE ON quota FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();

-- A closed quota holds nothing: whatever is left (or refunded later) goes back to due_from.
-- Checked when the transaction commits, after the release transfer and the state change.
CREATE FUNCTION quota_closed_empty() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (
        SELECT 1 FROM quota q JOIN account a ON a.id = q.account_id
        WHERE q.account_id = NEW.id AND q.state = 'closed'
          AND (a.credits_posted - a.debits_posted <> 0 OR a.debits_pending <> 0 OR a.credits_pending <> 0)) THEN
        RAISE EXCEPTION 'closed quota % still holds money', NEW.id USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END;
$$;
CREATE CONSTRAINT TRIGGER quota_closed_is_empty AFTER UPDATE ON account
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.kind = 'quota')
    EXECUTE FUNCTION quota_closed_empty();
