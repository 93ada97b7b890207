-- A message read by its recipient (`read`, migration 0012) is as settled as a sent one: the
-- retention purge (migration 0011) deletes it too, through an index that knows it.
DROP INDEX IF EXISTS messages_settled;
CREATE INDEX messages_settled ON messages (updated_at) WHERE status IN ('sent', 'read', 'failed', 'cancelled');
