-- Question: how many repeats did the broker send, per UTC day and reason?
--   Per day with any delivery: all deliveries, the new commands among them,
--   and the duplicates by reason (retained_replay: a retained message sent
--   again after a SUBSCRIBE; redelivery: a QoS 1 message re-sent with DUP=1
--   after a lost PUBACK). Many retained replays mean many re-subscriptions
--   (lost sessions); redeliveries mean connections that broke.
--   The long form (day, reason, count) is the view duplicates_daily.
--
-- Run (read-only: safe while cmdrelayd runs):
--   sqlite3 -readonly -header -column /var/lib/cmdrelay/history.db < sql/queries/duplicates-by-reason-per-day.sql
-- With parameters (a quoted here-document, run from the source or share directory):
--   sqlite3 -readonly -header -column /var/lib/cmdrelay/history.db <<'EOF'
--   .parameter set :days 30
--   .read sql/queries/duplicates-by-reason-per-day.sql
--   EOF
--   (In .parameter set, write a text value as "'...'": unquoted, the CLI
--   computes what looks like arithmetic, e.g. 2026-11-24 becomes 1991.)
--
-- Parameters:
--   :days  only the last N days (today counts as one); unset: the whole history
--
-- Columns: day (YYYY-MM-DD, UTC), deliveries, accepted, duplicates,
--   retained_replay, redelivery.

SELECT strftime('%Y-%m-%d', received_at / 1000, 'unixepoch') AS day,
       count(*) AS deliveries,
       count(*) FILTER (WHERE status = 'accepted') AS accepted,
       count(*) FILTER (WHERE status = 'duplicate') AS duplicates,
       count(*) FILTER (WHERE reason = 'retained_replay') AS retained_replay,
       count(*) FILTER (WHERE reason = 'redelivery') AS redelivery
  FROM messages
 WHERE :days IS NULL
    OR received_at >= CAST(strftime('%s', 'now', 'start of day', '-' || (:days - 1) || ' days') AS INTEGER) * 1000
 GROUP BY day
 ORDER BY day;
