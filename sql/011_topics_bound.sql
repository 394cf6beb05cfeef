-- Schema version 11: a bounded retained-replay state (store.max_topics).
--
-- Only the newest command of the store.max_topics most recently active
-- topics is kept past retention (topics.last_accepted, found through
-- topics_last); a topic whose accepted commands are all gone leaves topics,
-- and with it its filter_topics rows.
CREATE INDEX topics_last ON topics (last_accepted);
CREATE INDEX filter_topics_topic ON filter_topics (topic);

CREATE TRIGGER topics_gone AFTER DELETE ON topics BEGIN
    DELETE FROM filter_topics WHERE topic = old.topic;
END;

-- A consumer's lag in stats and metrics counts its filter's topics' rows
-- after its ack through this index, a seek per topic, instead of walking
-- every row after the ack (daemon/store.c store_consumers).
CREATE INDEX messages_topic_id ON messages (topic) WHERE status = 'accepted';
