-- Schema version 5: the uplink outbox. A local program's publication is
-- committed here before cmdrelayd answers "queued", and marked sent when the
-- broker acknowledged it (QoS 1) or it was written (QoS 0). 'failed' is for a
-- message libmosquitto refuses to publish at all; it does not hold up the rest.

CREATE TABLE outbox (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    queued_at INTEGER NOT NULL,                  -- Unix ms
    topic     TEXT    NOT NULL,
    payload   BLOB    NOT NULL,
    qos       INTEGER NOT NULL CHECK (qos IN (0, 1)),
    retain    INTEGER NOT NULL,
    origin    TEXT    NOT NULL,                  -- who queued it: consumer, uid, pid
    status    TEXT    NOT NULL DEFAULT 'queued' CHECK (status IN ('queued', 'sent', 'failed')),
    sent_at   INTEGER,                           -- Unix ms of the PUBACK (QoS 1) or the write (QoS 0)
    attempts  INTEGER NOT NULL DEFAULT 0         -- how often it was handed to the broker connection
);

CREATE INDEX outbox_queued ON outbox (id) WHERE status = 'queued';
