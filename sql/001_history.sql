-- Schema version 1: every delivery from the broker, and what the broker
-- session is subscribed to. Applied by cmdrelayd on start (PRAGMA user_version).

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

-- One row per PUBLISH received (G2). id is the consumers' cursor: AUTOINCREMENT
-- keeps it monotonic even after retention deleted the newest rows.
CREATE TABLE messages (
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
    reason       TEXT    CHECK (reason IN ('retained_replay', 'redelivery')),
    duplicate_of INTEGER REFERENCES messages (id),
    device       TEXT,                           -- the {device} segment of topic_fields
    fields       TEXT,                           -- JSON object of all topic_fields segments
    CHECK ((status = 'accepted') = (reason IS NULL)),
    CHECK ((status = 'accepted') = (duplicate_of IS NULL))
);

CREATE INDEX messages_dedup ON messages (topic, payload_hash) WHERE status = 'accepted';
CREATE INDEX messages_device ON messages (device, id);
CREATE INDEX messages_received_at ON messages (received_at);

-- The filters the broker holds for our durable session (G8).
CREATE TABLE session_subscriptions (
    filter        TEXT    PRIMARY KEY,
    qos           INTEGER NOT NULL,
    subscribed_at INTEGER NOT NULL
) WITHOUT ROWID;

-- The accepted commands, with readable UTC time.
CREATE VIEW commands AS
SELECT id,
       strftime('%Y-%m-%dT%H:%M:%fZ', received_at / 1000.0, 'unixepoch') AS received,
       device,
       topic,
       CAST(payload AS TEXT) AS payload,
       qos,
       retain,
       fields,
       received_at
  FROM messages
 WHERE status = 'accepted';
