-- Schema version 10: the highest command id ever sent to each named
-- consumer, written before the command leaves. A command at or below it
-- that is sent again (after a reconnect, a relay restart or a reset) carries
-- "redelivered": true: the consumer may have seen it before.
ALTER TABLE consumers ADD COLUMN sent_id INTEGER NOT NULL DEFAULT 0;
