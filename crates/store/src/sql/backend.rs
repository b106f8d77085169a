//! What differs between SQLite and PostgreSQL: connection set-up, the statements that
//! take JSON batches, and the migrations.

/// Which SQL engine a store runs on; the few statements that differ are picked by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// Starts a write transaction. SQLite takes the write lock at once, so the fence read
    /// that follows cannot go stale before the write.
    pub(super) fn begin_write(self) -> &'static str {
        match self {
            Backend::Sqlite => "BEGIN IMMEDIATE",
            Backend::Postgres => "BEGIN",
        }
    }

    /// Checks a fence. On PostgreSQL the shared row lock makes a concurrent takeover of the
    /// lease wait until this transaction ends, so no write lands after the lease moved.
    pub(super) fn fence_query(self) -> &'static str {
        match self {
            Backend::Sqlite => {
                "SELECT 1 FROM slot_leases WHERE slot = $1 AND owner = $2 AND epoch = $3 AND released = 0"
            }
            Backend::Postgres => {
                "SELECT 1 FROM slot_leases WHERE slot = $1 AND owner = $2 AND epoch = $3 AND released = 0 FOR SHARE"
            }
        }
    }

    /// Idle sessions in a set of slots, given as a JSON array in `$3`. A JSON parameter
    /// keeps the statement text constant whatever the number of slots.
    pub(super) fn idle_sessions_query(self) -> &'static str {
        match self {
            Backend::Sqlite => {
                "SELECT session_id, slot, last_activity_us FROM sessions \
                 WHERE last_activity_us < $1 AND slot IN (SELECT value FROM json_each($3)) \
                 ORDER BY last_activity_us LIMIT $2"
            }
            Backend::Postgres => {
                "SELECT session_id, slot, last_activity_us FROM sessions \
                 WHERE last_activity_us < $1 \
                   AND slot IN (SELECT value::bigint FROM json_array_elements_text($3::json)) \
                 ORDER BY last_activity_us LIMIT $2"
            }
        }
    }

    /// Inserts many messages from one JSON array in `$1` of objects with the session id
    /// in hex (`s`), seq (`q`), role (`r`), content (`c`), name (`n`) and time (`t`).
    pub(super) fn insert_messages_query(self) -> &'static str {
        match self {
            Backend::Sqlite => {
                "INSERT INTO messages (session_id, seq, role, content, name, created_at_us) \
                 SELECT unhex(json_extract(value, '$.s')), json_extract(value, '$.q'), \
                        json_extract(value, '$.r'), json_extract(value, '$.c'), \
                        json_extract(value, '$.n'), json_extract(value, '$.t') \
                 FROM json_each($1)"
            }
            Backend::Postgres => {
                "INSERT INTO messages (session_id, seq, role, content, name, created_at_us) \
                 SELECT decode(m.s, 'hex'), m.q, m.r, m.c, m.n, m.t \
                 FROM json_to_recordset($1::json) AS m(s text, q bigint, r text, c text, n text, t bigint)"
            }
        }
    }

    /// The fences, of a JSON array in `$1` of `{s: slot, o: owner, e: epoch}`, that hold
    /// (locked for the transaction on PostgreSQL, as in `fence_query`).
    pub(super) fn holding_fences_query(self) -> &'static str {
        match self {
            Backend::Sqlite => {
                "SELECT l.slot AS slot, l.owner AS owner, l.epoch AS epoch FROM slot_leases AS l \
                 JOIN json_each($1) AS f ON l.slot = json_extract(f.value, '$.s') \
                  AND l.owner = json_extract(f.value, '$.o') AND l.epoch = json_extract(f.value, '$.e') \
                 WHERE l.released = 0"
            }
            Backend::Postgres => {
                "SELECT l.slot AS slot, l.owner AS owner, l.epoch AS epoch FROM slot_leases AS l \
                 JOIN json_to_recordset($1::json) AS f(s bigint, o text, e bigint) \
                   ON l.slot = f.s AND l.owner = f.o AND l.epoch = f.e \
                 WHERE l.released = 0 \
                 FOR SHARE OF l"
            }
        }
    }

    /// The leases of a set of slots, given as a JSON array in `$1`.
    pub(super) fn slot_leases_query(self) -> &'static str {
        match self {
            Backend::Sqlite => {
                "SELECT slot, owner, epoch, released FROM slot_leases \
                 WHERE slot IN (SELECT value FROM json_each($1)) ORDER BY slot"
            }
            Backend::Postgres => {
                "SELECT slot, owner, epoch, released FROM slot_leases \
                 WHERE slot IN (SELECT value::bigint FROM json_array_elements_text($1::json)) \
                 ORDER BY slot"
            }
        }
    }

    /// Adds to sessions' message counts from a JSON array in `$1` of `{i: session id in
    /// hex, n: messages added, t: activity time}`; returns each session's new count.
    pub(super) fn count_messages_query(self) -> &'static str {
        match self {
            Backend::Sqlite => {
                "UPDATE sessions SET message_count = sessions.message_count + j.n, last_activity_us = j.t \
                 FROM (SELECT unhex(json_extract(value, '$.i')) AS id, json_extract(value, '$.n') AS n, \
                              json_extract(value, '$.t') AS t FROM json_each($1)) AS j \
                 WHERE sessions.session_id = j.id \
                 RETURNING lower(hex(sessions.session_id)) AS id, sessions.message_count AS message_count"
            }
            Backend::Postgres => {
                "UPDATE sessions AS s SET message_count = s.message_count + j.n, last_activity_us = j.t \
                 FROM json_to_recordset($1::json) AS j(i text, n bigint, t bigint) \
                 WHERE s.session_id = decode(j.i, 'hex') \
                 RETURNING encode(s.session_id, 'hex') AS id, s.message_count AS message_count"
            }
        }
    }

    pub(super) fn migrations(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Backend::Sqlite => &[
                (
                    "initial",
                    include_str!("../../migrations/sqlite/0001_initial.sql"),
                ),
                (
                    "double text",
                    include_str!("../../migrations/sqlite/0002_double_text.sql"),
                ),
                (
                    "handoff and placement",
                    include_str!("../../migrations/sqlite/0003_handoff_and_placement.sql"),
                ),
                (
                    "request ids",
                    include_str!("../../migrations/sqlite/0004_request_ids.sql"),
                ),
                (
                    "system messages",
                    include_str!("../../migrations/sqlite/0005_system_messages.sql"),
                ),
            ],
            Backend::Postgres => &[
                (
                    "initial",
                    include_str!("../../migrations/postgres/0001_initial.sql"),
                ),
                (
                    "double text",
                    include_str!("../../migrations/postgres/0002_double_text.sql"),
                ),
                (
                    "handoff and placement",
                    include_str!("../../migrations/postgres/0003_handoff_and_placement.sql"),
                ),
                (
                    "request ids",
                    include_str!("../../migrations/postgres/0004_request_ids.sql"),
                ),
                (
                    "system messages",
                    include_str!("../../migrations/postgres/0005_system_messages.sql"),
                ),
            ],
        }
    }
}
