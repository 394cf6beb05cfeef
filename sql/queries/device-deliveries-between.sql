-- Question: what did device X get between T1 and T2?
--   Every delivery recorded for the device in [from, until), in history
--   order: the commands (status accepted) and the repeats the relay
--   recognised (status duplicate, with reason and the id of the command they
--   repeat).
--
-- Run (read-only: safe while cmdrelayd runs):
--   sqlite3 -readonly -header -column /var/lib/cmdrelay/history.db < sql/queries/device-deliveries-between.sql
-- With parameters (a quoted here-document, run from the source or share directory):
--   sqlite3 -readonly -header -column /var/lib/cmdrelay/history.db <<'EOF'
--   .parameter set :device "'012C000003AX'"
--   .parameter set :from "'2026-11-25'"
--   .parameter set :until "'2026-11-25T12:00:00Z'"
--   .read sql/queries/device-deliveries-between.sql
--   EOF
--   (In .parameter set, write a text value as "'...'": unquoted, the CLI
--   computes what looks like arithmetic, e.g. 2026-11-24 becomes 1991.)
--
-- Parameters (each optional):
--   :device  the {device} topic segment; unset: every device
--   :from    UTC, 'YYYY-MM-DD', 'YYYY-MM-DDTHH:MM:SSZ' or 'YYYY-MM-DD HH:MM:SS';
--            unset: the oldest row kept
--   :until   same formats, excluded; unset: no upper bound
--   A time SQLite cannot read gives no rows (rather than the whole history).
--
-- Columns: id, received (UTC), device, topic, status, reason, duplicate_of,
--   retain, dup, payload.

WITH params(device, from_ms, until_ms) AS (
    SELECT :device,
           CASE WHEN :from IS NULL THEN 0
                ELSE CAST(strftime('%s', :from) AS INTEGER) * 1000 END,
           CASE WHEN :until IS NULL THEN 9223372036854775807
                ELSE CAST(strftime('%s', :until) AS INTEGER) * 1000 END
)
SELECT d.id, d.received, d.device, d.topic, d.status, d.reason, d.duplicate_of,
       d.retain, d.dup, d.payload
  FROM deliveries d, params p
 WHERE (p.device IS NULL OR d.device = p.device)
   AND d.received_at >= p.from_ms
   AND d.received_at < p.until_ms
 ORDER BY d.id;
