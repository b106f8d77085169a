-- The request ids of a session's appends and turns, written in the same transaction as the
-- messages, so a retried call is recognised and answered as the first one was. They live
-- as long as the session. `turn` is 1 for a SendMessage (its user message is `last_seq`;
-- the reply and its usage are filled in when the reply commits), 0 for an AppendContext.
CREATE TABLE request_ids (
    session_id BLOB NOT NULL,
    request_id TEXT NOT NULL,
    turn INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    reply_seq INTEGER,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    compute_us INTEGER,
    PRIMARY KEY (session_id, request_id)
) WITHOUT ROWID;
