-- Operations (docs/operations.md): indexes for the console's audit trail and /ready.
--
-- `plt-node audit list --since ... --subject ...` reads audit_event by time, and by subject
-- then time; /ready reports when each peer was last heard from (the newest message received
-- from it). Nothing here changes data; audit_event stays append-only (0002's trigger).

CREATE INDEX audit_event_at ON audit_event (at, id);
CREATE INDEX audit_event_subject_at ON audit_event (subject, at, id) WHERE subject IS NOT NULL;
CREATE INDEX plt_message_in_from_at ON plt_message (from_node, at) WHERE direction = 'in';
-- Grants decided at A but not acknowledged by B: `grants in-doubt` and the in-doubt gauge
-- of /metrics look them up at every scrape.
CREATE INDEX grant_out_unacked ON grant_out (decided_at)
    WHERE state IN ('COMMITTED', 'ABORTED') AND NOT acked;
