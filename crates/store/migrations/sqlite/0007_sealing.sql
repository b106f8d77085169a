-- Encryption at rest: each session's data key, wrapped by a key-encryption key that never
-- enters the store (kek_id names it). Deleted with its session, in the same transaction.
CREATE TABLE session_keys (
    session_id BLOB PRIMARY KEY,
    kek_id TEXT NOT NULL,
    wrapped BLOB NOT NULL
) WITHOUT ROWID;
CREATE INDEX session_keys_by_kek ON session_keys (kek_id);

-- 1 once every message content and metadata value in the store is sealed.
ALTER TABLE cluster ADD COLUMN sealed BIGINT NOT NULL DEFAULT 0;
