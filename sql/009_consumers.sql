-- Schema version 9: when each consumer last acknowledged, NULL until its
-- first ack (updated_at also moves at every hello, so it cannot tell).
ALTER TABLE consumers ADD COLUMN acked_at INTEGER;	-- Unix ms of the last ack, or NULL

-- Rows recorded by the socket op inject (cmdrelayctl inject), to test
-- consumers without a broker: 1, never sent by any broker.
ALTER TABLE messages ADD COLUMN injected INTEGER NOT NULL DEFAULT 0;
