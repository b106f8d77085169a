-- The request ids of a session's appends and turns, written in the same transaction as the
-- messages, so a retried call is recognised and answered as the first one was. They live
-- as long as the session. `turn` is 1 for a SendMessage (its user message is `last_seq`;
-- the reply and its usage are filled in when the reply commits), 0 for an AppendContext.
CREATE TABLE request_ids (
    session_id BYTEA NOT NULL,
    request_id TEXT NOT NULL,
    turn BIGINT NOT NULL,
    last_seq BIGINT NOT NULL,
    reply_seq BIGINT,
    prompt_tokens BIGINT,
    completion_tokens BIGINT,
    compute_us BIGINT,
    PRIMARY KEY (session_id, request_id)
);
