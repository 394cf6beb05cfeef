-- Schema version 4: what retention must keep.
--
-- topics.last_accepted is the newest accepted row of each topic. Retention
-- never removes it: it is the command a retained replay repeats, and without
-- it a replay months later would be taken for a new command.
ALTER TABLE topics ADD COLUMN last_accepted INTEGER;

UPDATE topics
   SET last_accepted = (SELECT max(id) FROM messages m
                         WHERE m.topic = topics.topic AND m.status = 'accepted');
