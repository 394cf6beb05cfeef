-- Schema version 6: the dedup rule of "a duplicate only when the broker can be
-- sending a row of ours again" (README, "How repeats are recognised").
--
-- messages.reason gains 'possible_repeat': an accepted row that may repeat
-- duplicate_of, delivered to consumers flagged. SQLite cannot change a CHECK
-- constraint in place, so the table is rebuilt once (sqlite.org/lang_altertable.html,
-- "making other kinds of table schema changes"); ids and the AUTOINCREMENT
-- sequence are kept. legacy_alter_table leaves the views, which name
-- "messages", as they are during the rename.

PRAGMA legacy_alter_table = ON;

CREATE TABLE messages_v6 (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at  INTEGER NOT NULL,               -- Unix time in milliseconds
    topic        TEXT    NOT NULL,
    payload      BLOB    NOT NULL,
    payload_hash INTEGER NOT NULL,               -- FNV-1a 64 of payload, for dedup look-ups
    qos          INTEGER NOT NULL,
    retain       INTEGER NOT NULL,
    dup          INTEGER NOT NULL,
    mid          INTEGER NOT NULL,               -- MQTT packet id (0 for QoS 0)
    connection   INTEGER NOT NULL,               -- which broker connection delivered it
    status       TEXT    NOT NULL CHECK (status IN ('accepted', 'duplicate')),
    reason       TEXT    CHECK (reason IN ('retained_replay', 'redelivery', 'possible_repeat')),
    duplicate_of INTEGER REFERENCES messages (id),
    device       TEXT,                           -- the {device} segment of topic_fields
    fields       TEXT,                           -- JSON object of all topic_fields segments
    -- a duplicate says why; an accepted row only when it may repeat another
    CHECK (CASE status WHEN 'accepted' THEN coalesce(reason, 'possible_repeat') = 'possible_repeat'
                       ELSE reason IN ('retained_replay', 'redelivery') END),
    CHECK ((reason IS NULL) = (duplicate_of IS NULL))
);

INSERT INTO messages_v6 SELECT id, received_at, topic, payload, payload_hash, qos, retain, dup,
       mid, connection, status, reason, duplicate_of, device, fields FROM messages;
DELETE FROM sqlite_sequence WHERE name = 'messages_v6';
INSERT INTO sqlite_sequence (name, seq) SELECT 'messages_v6', seq FROM sqlite_sequence WHERE name = 'messages';
DROP TABLE messages;
ALTER TABLE messages_v6 RENAME TO messages;

CREATE INDEX messages_dedup ON messages (topic, payload_hash) WHERE status = 'accepted';
CREATE INDEX messages_device ON messages (device, id);
CREATE INDEX messages_received_at ON messages (received_at);

PRAGMA legacy_alter_table = OFF;

-- The messages the broker may still hold without our PUBACK: recorded, but
-- the broker has not been shown to have received their PUBACK. Small: what
-- the broker's in-flight window holds at a crash.
CREATE TABLE broker_unacked (
    entry      INTEGER PRIMARY KEY,   -- messages.id of its first delivery to us
    command    INTEGER NOT NULL,      -- the accepted row it carries
    mid        INTEGER NOT NULL,      -- packet id of its latest delivery
    connection INTEGER NOT NULL,      -- the connection of its latest delivery
    last_row   INTEGER NOT NULL       -- messages.id of its latest delivery
);

DROP VIEW device_daily;
CREATE VIEW device_daily AS
SELECT strftime('%Y-%m-%d', received_at / 1000, 'unixepoch') AS day,
       device,
       count(*) FILTER (WHERE status = 'accepted')        AS accepted,
       count(*) FILTER (WHERE status = 'duplicate')       AS duplicates,
       count(*) FILTER (WHERE reason = 'retained_replay') AS retained_replays,
       count(*) FILTER (WHERE reason = 'redelivery')      AS redeliveries,
       count(*) FILTER (WHERE reason = 'possible_repeat') AS possible_repeats
  FROM messages
 GROUP BY day, device;
