-- Question: what is the last command each device was sent?
--   One row per device: its newest accepted command (duplicates are not
--   commands, so a retained replay after a restart does not count).
--
-- Run (read-only: safe while cmdrelayd runs):
--   sqlite3 -readonly -header -column /var/lib/cmdrelay/history.db < sql/queries/last-command-per-device.sql
--
-- Parameters: none.
--
-- Columns: device, id, received (UTC), topic, payload, retain (1: it came as
--   a retained message), pending_for (named consumers that have not
--   acknowledged it yet, comma separated, NULL when all did).

SELECT d.device,
       d.id,
       d.received,
       d.topic,
       d.payload,
       d.retain,
       (SELECT group_concat(name, ',')
          FROM (SELECT c.name
                  FROM consumers c
                  JOIN filter_topics f ON f.filter = c.filter AND f.topic = d.topic
                 WHERE c.acked_id < d.id
                 ORDER BY c.name)) AS pending_for
  FROM deliveries d
 WHERE d.id IN (SELECT max(id) FROM messages WHERE status = 'accepted' GROUP BY device)
 ORDER BY d.device;
