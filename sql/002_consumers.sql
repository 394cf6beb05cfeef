-- Schema version 2: the named consumers' durable cursors, and which topics
-- each consumer filter matches.

CREATE TABLE consumers (
    name       TEXT    PRIMARY KEY,
    filter     TEXT    NOT NULL,               -- MQTT topic filter
    acked_id   INTEGER NOT NULL,               -- everything up to here is done
    updated_at INTEGER NOT NULL                -- Unix ms of the last hello or ack
) WITHOUT ROWID;

-- Every topic the history has seen, and the consumer filters that match it.
-- cmdrelayd does the MQTT wildcard matching once per (filter, topic), so
-- that plain SQL (consumer_lag, the admin queries) can join on the result.
CREATE TABLE topics (
    topic TEXT PRIMARY KEY
) WITHOUT ROWID;

CREATE TABLE filter_topics (
    filter TEXT NOT NULL,
    topic  TEXT NOT NULL,
    PRIMARY KEY (filter, topic)
) WITHOUT ROWID;

INSERT INTO topics SELECT DISTINCT topic FROM messages;

-- Per consumer: how many accepted commands matching its filter it has not
-- acknowledged yet.
CREATE VIEW consumer_lag AS
SELECT c.name AS consumer,
       c.filter,
       c.acked_id,
       strftime('%Y-%m-%dT%H:%M:%fZ', c.updated_at / 1000.0, 'unixepoch') AS updated,
       (SELECT count(*)
          FROM messages m
         WHERE m.status = 'accepted'
           AND m.id > c.acked_id
           AND m.topic IN (SELECT f.topic FROM filter_topics f WHERE f.filter = c.filter)) AS lag
  FROM consumers c;
