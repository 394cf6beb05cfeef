-- Schema version 3: views for admins, per UTC day. Plain SQL only (no
-- functions of cmdrelayd), so that the sqlite3 CLI and any other SQLite client
-- can use them. Example queries built on them are in sql/queries/.

-- Per UTC day and device: the deliveries the relay recorded, split into new
-- commands and the duplicates it recognised (G2). device is NULL for topics
-- that topic_fields gives no {device}.
CREATE VIEW device_daily AS
SELECT strftime('%Y-%m-%d', received_at / 1000, 'unixepoch') AS day,
       device,
       count(*) FILTER (WHERE status = 'accepted')        AS accepted,
       count(*) FILTER (WHERE status = 'duplicate')       AS duplicates,
       count(*) FILTER (WHERE reason = 'retained_replay') AS retained_replays,
       count(*) FILTER (WHERE reason = 'redelivery')      AS redeliveries
  FROM messages
 GROUP BY day, device;

-- Per UTC day: how many duplicates of each reason the relay recorded (days
-- and reasons without any duplicate have no row).
CREATE VIEW duplicates_daily AS
SELECT strftime('%Y-%m-%d', received_at / 1000, 'unixepoch') AS day,
       reason,
       count(*) AS count
  FROM messages
 WHERE status = 'duplicate'
 GROUP BY day, reason;

-- Every delivery (accepted or duplicate) with readable UTC time, for reading
-- rather than for computing. payload is the text; a payload holding a NUL or
-- another control byte than tab, LF or CR is shown as 'hex:' and its bytes in
-- hex instead (hex(messages.payload) gives the bytes of any row).
CREATE VIEW deliveries AS
SELECT id,
       strftime('%Y-%m-%dT%H:%M:%fZ', received_at / 1000.0, 'unixepoch') AS received,
       device,
       topic,
       status,
       reason,
       duplicate_of,
       retain,
       dup,
       CASE WHEN instr(payload, x'00') > 0
              OR CAST(payload AS TEXT) GLOB ('*[' || char(1) || '-' || char(8) || char(11) || char(12)
                                             || char(14) || '-' || char(31) || char(127) || ']*')
            THEN 'hex:' || hex(payload)
            ELSE CAST(payload AS TEXT)
       END AS payload,
       received_at
  FROM messages;
