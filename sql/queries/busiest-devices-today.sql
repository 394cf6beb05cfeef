-- Question: which devices got the most commands today?
--   Per device, for one UTC day (default: today): new commands, and the
--   duplicates recognised, by reason. Most commands first. Built on the view
--   device_daily.
--
-- Run (read-only: safe while cmdrelayd runs):
--   sqlite3 -readonly -header -column /var/lib/cmdrelay/history.db < sql/queries/busiest-devices-today.sql
-- With parameters (a quoted here-document, run from the source or share directory):
--   sqlite3 -readonly -header -column /var/lib/cmdrelay/history.db <<'EOF'
--   .parameter set :day "'2026-11-24'"
--   .parameter set :top 5
--   .read sql/queries/busiest-devices-today.sql
--   EOF
--   (In .parameter set, write a text value as "'...'": unquoted, the CLI
--   computes what looks like arithmetic, e.g. 2026-11-24 becomes 1991.)
--
-- Parameters:
--   :day  another UTC day, 'YYYY-MM-DD'; unset: today (UTC)
--   :top  how many devices; unset: 10
--
-- Columns: device, accepted, duplicates, retained_replays, redeliveries.

SELECT device, accepted, duplicates, retained_replays, redeliveries
  FROM device_daily
 WHERE day = coalesce(:day, strftime('%Y-%m-%d', 'now'))
 ORDER BY accepted DESC, duplicates DESC, device
 LIMIT coalesce(:top, 10);
