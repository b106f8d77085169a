-- Messages stored in the order they are written, found by (session_id, seq) through a
-- unique index. Keyed by (session_id, seq) itself, every append landed in the middle of the
-- table's b-tree, in the leaf of its session: a batch rewrote a leaf per session, and a
-- leaf that filled split into three rewritten pages. Now a batch's messages fill the last
-- page or two of the table together, and only the index's small entries land per session.
-- The unique index keeps a forked seq impossible, as the primary key did.
CREATE TABLE messages_in_write_order (
    id INTEGER PRIMARY KEY,
    session_id BLOB NOT NULL,
    seq INTEGER NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    name TEXT NOT NULL,
    created_at_us INTEGER NOT NULL
);
INSERT INTO messages_in_write_order (session_id, seq, role, content, name, created_at_us)
    SELECT session_id, seq, role, content, name, created_at_us FROM messages
    ORDER BY session_id, seq;
DROP TABLE messages;
ALTER TABLE messages_in_write_order RENAME TO messages;
CREATE UNIQUE INDEX messages_by_seq ON messages (session_id, seq);
CREATE INDEX messages_system ON messages (session_id, seq) WHERE role = 'system';
