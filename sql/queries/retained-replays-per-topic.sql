-- Question: which topics had retained messages replayed lately?
--   Per topic, over the last :days days (default 7): how many retained
--   replays the relay recognised and dropped, how many distinct commands they
--   repeated, and the last one. Each replay follows a SUBSCRIBE (a lost broker
--   session, a config change); a topic that keeps a stale retained command
--   shows up here after every re-subscription. Clear one with an empty
--   retained publish: mosquitto_pub -t TOPIC -r -n
--
-- Run (read-only: safe while cmdrelayd runs):
--   sqlite3 -readonly -header -column /var/lib/cmdrelay/history.db < sql/queries/retained-replays-per-topic.sql
-- With parameters (a quoted here-document, run from the source or share directory):
--   sqlite3 -readonly -header -column /var/lib/cmdrelay/history.db <<'EOF'
--   .parameter set :days 30
--   .read sql/queries/retained-replays-per-topic.sql
--   EOF
--   (In .parameter set, write a text value as "'...'": unquoted, the CLI
--   computes what looks like arithmetic, e.g. 2026-11-24 becomes 1991.)
--
-- Parameters:
--   :days  how many days back from now; unset: 7
--
-- Columns: topic, replays, commands (distinct commands replayed),
--   last_replay (UTC).

WITH params(since_ms) AS (
    SELECT (CAST(strftime('%s', 'now') AS INTEGER) - coalesce(:days, 7) * 86400) * 1000
)
SELECT m.topic,
       count(*) AS replays,
       count(DISTINCT m.duplicate_of) AS commands,
       strftime('%Y-%m-%dT%H:%M:%fZ', max(m.received_at) / 1000.0, 'unixepoch') AS last_replay
  FROM messages m, params p
 WHERE m.reason = 'retained_replay'
   AND m.received_at >= p.since_ms
 GROUP BY m.topic
 ORDER BY replays DESC, m.topic;
