-- Question: which commands has consumer X not consumed (acknowledged) yet?
--   The accepted commands matching the consumer's filter after its last
--   acknowledgement, oldest first: what cmdrelayd will send it next. Topic
--   matching uses the table filter_topics that cmdrelayd keeps, so this is
--   plain SQL.
--
-- Run (read-only: safe while cmdrelayd runs):
--   sqlite3 -readonly -header -column /var/lib/cmdrelay/history.db < sql/queries/pending-for-consumer.sql
-- With parameters (a quoted here-document, run from the source or share directory):
--   sqlite3 -readonly -header -column /var/lib/cmdrelay/history.db <<'EOF'
--   .parameter set :consumer "'lamp'"
--   .read sql/queries/pending-for-consumer.sql
--   EOF
--   (In .parameter set, write a text value as "'...'": unquoted, the CLI
--   computes what looks like arithmetic, e.g. 2026-11-24 becomes 1991.)
--
-- Parameters:
--   :consumer  the consumer name (as in its hello); unset: every consumer
--
-- Columns: consumer, id, received (UTC), device, topic, payload.

SELECT c.name AS consumer,
       d.id,
       d.received,
       d.device,
       d.topic,
       d.payload
  FROM consumers c
  JOIN filter_topics f ON f.filter = c.filter
  JOIN deliveries d ON d.topic = f.topic
 WHERE d.status = 'accepted'
   AND d.id > c.acked_id
   AND (:consumer IS NULL OR c.name = :consumer)
 ORDER BY c.name, d.id;
