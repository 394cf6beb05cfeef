-- Question: which commands did the broker send again most often?
--   Each accepted command that has duplicates, with how many copies the
--   relay recognised and dropped, by reason, and when the last copy came.
--   A command repeated on every restart is usually a retained message that
--   nobody cleared.
--   A possible repeat (accepted, reason possible_repeat) also names the
--   command it equals in duplicate_of, but it was delivered: not a copy.
--
-- Run (read-only: safe while cmdrelayd runs):
--   sqlite3 -readonly -header -column /var/lib/cmdrelay/history.db < sql/queries/most-repeated-commands.sql
-- With parameters (a quoted here-document, run from the source or share directory):
--   sqlite3 -readonly -header -column /var/lib/cmdrelay/history.db <<'EOF'
--   .parameter set :top 5
--   .read sql/queries/most-repeated-commands.sql
--   EOF
--   (In .parameter set, write a text value as "'...'": unquoted, the CLI
--   computes what looks like arithmetic, e.g. 2026-11-24 becomes 1991.)
--
-- Parameters:
--   :top  how many commands; unset: 20
--
-- Columns: id, received (UTC), device, topic, payload, copies,
--   retained_replays, redeliveries, last_copy (UTC).

SELECT a.id,
       a.received,
       a.device,
       a.topic,
       a.payload,
       count(*) AS copies,
       count(*) FILTER (WHERE m.reason = 'retained_replay') AS retained_replays,
       count(*) FILTER (WHERE m.reason = 'redelivery') AS redeliveries,
       strftime('%Y-%m-%dT%H:%M:%fZ', max(m.received_at) / 1000.0, 'unixepoch') AS last_copy
  FROM deliveries a
  JOIN messages m ON m.duplicate_of = a.id AND m.status = 'duplicate'
 GROUP BY a.id
 ORDER BY copies DESC, a.id
 LIMIT coalesce(:top, 20);
