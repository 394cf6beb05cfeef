-- Question: which consumers are behind, and by how much?
--   Every named consumer with its filter, the last id it acknowledged, how
--   many matching commands it has not acknowledged (lag), when it last said
--   hello or acked, and the time of its oldest unacknowledged command.
--   Most behind first. Built on the view consumer_lag.
--
-- Run (read-only: safe while cmdrelayd runs):
--   sqlite3 -readonly -header -column /var/lib/cmdrelay/history.db < sql/queries/consumer-lag.sql
--
-- Parameters: none.
--
-- Columns: consumer, filter, acked_id, lag, last_seen (UTC), oldest_pending
--   (UTC, NULL when lag is 0).

SELECT l.consumer,
       l.filter,
       l.acked_id,
       l.lag,
       l.updated AS last_seen,
       (SELECT strftime('%Y-%m-%dT%H:%M:%fZ', m.received_at / 1000.0, 'unixepoch')
          FROM messages m
          JOIN filter_topics f ON f.filter = l.filter AND f.topic = m.topic
         WHERE m.status = 'accepted' AND m.id > l.acked_id
         ORDER BY m.id
         LIMIT 1) AS oldest_pending
  FROM consumer_lag l
 ORDER BY l.lag DESC, l.consumer;
