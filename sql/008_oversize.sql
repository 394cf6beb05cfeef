-- Schema version 8: commands too large to keep (store.max_payload).
--
-- oversize is the payload's length in bytes when it exceeded
-- store.max_payload: the row records the delivery (topic, time, packet id,
-- hash of the whole payload), its payload is dropped (empty), and it is not
-- handed to consumers. NULL on every other row.
ALTER TABLE messages ADD COLUMN oversize INTEGER;
