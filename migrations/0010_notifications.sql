-- Notifications for app users (issue 12): one row per (recipient, event), written in the
-- transaction of the state change that causes it (wallet.notifications.record), read by the
-- app as a list and a Server-Sent Events stream, and pushed by a worker through the
-- province's push gateway (wallet.push).
--
-- `id` is the stream's cursor (SSE `Last-Event-ID`). Writers of one recipient are serialised
-- by a transaction-scoped advisory lock taken before the id is drawn, so a recipient's ids
-- commit in increasing order and a stream reading `id > cursor` never skips a row.

CREATE TABLE notification (
    id                       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    person_id                bigint NOT NULL REFERENCES insured_person (id),
    kind                     text NOT NULL CHECK (kind ~ '^[a-z_]+(\.[a-z_]+)+$'),
    -- What happened, once per recipient: 'grant:prov-13/<transfer id>:offered', ...
    event_key                text NOT NULL CHECK (length(event_key) BETWEEN 1 AND 200),
    created_at               timestamptz NOT NULL,
    amount_fen               bigint CHECK (amount_fen >= 0),
    -- The other person, masked (never an ID number), and their province (GB/T 2260).
    counterpart_name_masked  text CHECK (length(counterpart_name_masked) BETWEEN 1 AND 100),
    counterpart_province     text CHECK (counterpart_province ~ '^[0-9]{6}$'),
    -- The time by which the recipient must act (a grant offered: the 06:00 deadline).
    deadline                 timestamptz,
    -- The ids the app opens (transfer_id, relation_id, settlement_id, ...), and small extras.
    refs                     jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(refs) = 'object'),
    detail                   jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(detail) = 'object'),
    read_at                  timestamptz,
    -- Push delivery (wallet.push): pending until the gateway took it (sent) or gave up.
    push_state               text NOT NULL DEFAULT 'pending'
                             CHECK (push_state IN ('pending', 'sent', 'failed')),
    push_attempts            integer NOT NULL DEFAULT 0 CHECK (push_attempts >= 0),
    -- When the worker may (re)try: a claim moves it forward by a lease, a failure by backoff.
    push_next_at             timestamptz NOT NULL,
    push_done_at             timestamptz,
    push_last_error          text CHECK (length(push_last_error) <= 500),
    UNIQUE (person_id, event_key),
    CONSTRAINT notification_push_done CHECK ((push_state = 'pending') = (push_done_at IS NULL))
);

-- The list and the stream: a person's rows, newest first / after a cursor.
CREATE INDEX notification_person ON notification (person_id, id);
-- The unread count.
CREATE INDEX notification_unread ON notification (person_id) WHERE read_at IS NULL;
-- The push worker's claim and the backlog gauge.
CREATE INDEX notification_push_due ON notification (push_next_at) WHERE push_state = 'pending';
-- Pushes given up (a gauge in /metrics).
CREATE INDEX notification_push_failed ON notification (id) WHERE push_state = 'failed';
