-- The cluster this store belongs to: one row, created with the store.
CREATE TABLE cluster (
    singleton BIGINT PRIMARY KEY CHECK (singleton = 1),
    cluster_id TEXT NOT NULL,
    created_at_us BIGINT NOT NULL
);

CREATE TABLE sessions (
    session_id BYTEA PRIMARY KEY,
    user_id TEXT NOT NULL,
    slot BIGINT NOT NULL,
    created_at_us BIGINT NOT NULL,
    last_activity_us BIGINT NOT NULL,
    -- A JSON object of string keys to string values.
    metadata TEXT NOT NULL,
    message_count BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX sessions_by_user ON sessions (user_id, created_at_us);
CREATE INDEX sessions_by_slot_activity ON sessions (slot, last_activity_us);

-- The primary key makes a forked seq impossible: two writers cannot both commit seq N.
CREATE TABLE messages (
    session_id BYTEA NOT NULL,
    seq BIGINT NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    name TEXT NOT NULL,
    created_at_us BIGINT NOT NULL,
    PRIMARY KEY (session_id, seq)
);

-- Who may write each slot's data, since which placement epoch.
CREATE TABLE slot_leases (
    slot BIGINT PRIMARY KEY,
    owner TEXT NOT NULL,
    epoch BIGINT NOT NULL
);

-- Per-user usage per quota window.
CREATE TABLE user_usage (
    user_id TEXT NOT NULL,
    window_start_us BIGINT NOT NULL,
    api_calls BIGINT NOT NULL DEFAULT 0,
    tokens BIGINT NOT NULL DEFAULT 0,
    compute_ms BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, window_start_us)
);
