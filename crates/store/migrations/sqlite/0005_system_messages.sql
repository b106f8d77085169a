-- A turn sends its agent the newest messages plus every system message before them:
-- this index finds those without reading the session's whole history.
CREATE INDEX messages_system ON messages (session_id, seq) WHERE role = 'system';
