-- The cluster this store belongs to: one row, created with the store.
CREATE TABLE cluster (
    singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
    cluster_id TEXT NOT NULL,
    created_at_us INTEGER NOT NULL
);

CREATE TABLE sessions (
    session_id BLOB PRIMARY KEY,
    user_id TEXT NOT NULL,
    slot INTEGER NOT NULL,
    created_at_us INTEGER NOT NULL,
    last_activity_us INTEGER NOT NULL,
    -- A JSON object of string keys to string values.
    metadata TEXT NOT NULL,
    message_count INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX sessions_by_user ON sessions (user_id, created_at_us);
CREATE INDEX sessions_by_slot_activity ON sessions (slot, last_activity_us);

-- The primary key makes a forked seq impossible: two writers cannot both commit seq N.
CREATE TABLE messages (
    session_id BLOB NOT NULL,
    seq INTEGER NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    name TEXT NOT NULL,
    created_at_us INTEGER NOT NULL,
    PRIMARY KEY (session_id, seq)
) WITHOUT ROWID;

-- Who may write each slot's data, since which placement epoch.
CREATE TABLE slot_leases (
    slot INTEGER PRIMARY KEY,
    owner TEXT NOT NULL,
    epoch INTEGER NOT NULL
);

-- Per-user usage per quota window.
CREATE TABLE user_usage (
    user_id TEXT NOT NULL,
    window_start_us INTEGER NOT NULL,
    api_calls INTEGER NOT NULL DEFAULT 0,
    tokens INTEGER NOT NULL DEFAULT 0,
    compute_ms INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, window_start_us)
) WITHOUT ROWID;
