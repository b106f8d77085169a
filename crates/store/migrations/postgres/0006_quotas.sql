-- Per-user quota overrides, and the sliding-window usage they are checked against. The
-- first migration's user_usage table was never written; these replace it.
DROP TABLE user_usage;

CREATE TABLE user_quota_overrides (
    user_id TEXT NOT NULL,
    resource TEXT NOT NULL,
    limit_value DOUBLE PRECISION NOT NULL,
    window_us BIGINT NOT NULL,
    PRIMARY KEY (user_id, resource)
);

-- One row per user and windowed resource: the window's buckets as JSON, written by the
-- owner of the user's slot.
CREATE TABLE user_usage_windows (
    user_id TEXT NOT NULL,
    resource TEXT NOT NULL,
    state TEXT NOT NULL,
    PRIMARY KEY (user_id, resource)
);
