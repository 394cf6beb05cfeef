-- Schema version 7: retention ages rows on the age clock, not the
-- wall clock. age_ms and sent_age_ms are the daemon's age clock (meta
-- 'age_clock': CLOCK_BOOTTIME carried on across restarts) when the row was
-- received or sent, so an NTP step of the wall clock, in either direction,
-- neither deletes unacknowledged commands nor keeps them for ever.
-- Rows from before read their wall time as their age.
ALTER TABLE messages ADD COLUMN age_ms INTEGER;
UPDATE messages SET age_ms = received_at;
CREATE INDEX messages_age ON messages (age_ms);

ALTER TABLE outbox ADD COLUMN sent_age_ms INTEGER;
UPDATE outbox SET sent_age_ms = sent_at;
