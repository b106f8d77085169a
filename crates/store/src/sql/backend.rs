//! What differs between SQLite and PostgreSQL: connection set-up, the statements that
//! take JSON batches, and the migrations.

use std::sync::OnceLock;

use super::quota::sqlite_save_batch_usage;

/// [`crate::ACTIVITY_STEP`] in microseconds, as the SQL that moves activity writes it (a
/// unit test holds the two together).
macro_rules! activity_step_us {
    () => {
        "10000000"
    };
}

/// PostgreSQL: the activity of session `s` after an append at `j.t`, moved only once it has
/// fallen the step behind. In the update of the counts: PostgreSQL compares the values, so
/// a row whose activity stays is updated in place.
macro_rules! pg_moved_activity {
    () => {
        concat!(
            "CASE WHEN j.t >= s.last_activity_us + ",
            activity_step_us!(),
            " THEN j.t ELSE s.last_activity_us END"
        )
    };
}

/// SQLite: moves the activity of the sessions in the JSON array `$param` of `{i: session
/// hex, t: time}` to `t`, for those it has fallen [`crate::ACTIVITY_STEP`] (10 s) behind.
/// A statement of its own: SQLite rewrites an index entry whenever its column is set, even
/// to the value it holds, so the counts' update does not touch the activity.
macro_rules! sqlite_move_activity {
    ($param:literal) => {
        concat!(
            "UPDATE sessions SET last_activity_us = j.t \
             FROM (SELECT unhex(json_extract(value, '$.i')) AS id, json_extract(value, '$.t') AS t \
                   FROM jsonb_each(",
            $param,
            ")) AS j \
             WHERE sessions.session_id = j.id AND j.t >= sessions.last_activity_us + ",
            activity_step_us!(),
            "; "
        )
    };
}

/// How an SQLite commit syncs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Synchronous {
    /// Waits for the disk: durable when it returns.
    Full,
    /// Does not wait (WAL checkpoints still do, so nothing made durable is lost by them).
    Normal,
    /// Never waits, not even at checkpoints: memory benchmarks only.
    Off,
}

impl Synchronous {
    /// The statement that sets it on an SQLite connection.
    pub(super) fn pragma(self) -> &'static str {
        match self {
            Synchronous::Full => "PRAGMA synchronous = FULL",
            Synchronous::Normal => "PRAGMA synchronous = NORMAL",
            Synchronous::Off => "PRAGMA synchronous = OFF",
        }
    }
}

/// SQLite: how every connection to a store is set up, beside its journal mode and how its
/// commits sync. Deleted rows are overwritten, not left in free pages: what a session held
/// is gone from the file when it ends. Statement journals (a multi-row statement's undo)
/// stay in memory: on disk they cost every batch a file write per page it changes. The WAL
/// is cut back to 64 MiB whenever a checkpoint empties it.
pub(super) const SQLITE_CONNECTION_PRAGMAS: &str = "PRAGMA secure_delete = ON; \
     PRAGMA temp_store = MEMORY; PRAGMA journal_size_limit = 67108864";

/// Which SQL engine a store runs on; the few statements that differ are picked by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// The engine a store URL names: `sqlite:…`, `postgres:…` or `postgresql:…`.
    pub(super) fn of_url(url: &str) -> Option<Backend> {
        if url.starts_with("sqlite:") {
            Some(Backend::Sqlite)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Some(Backend::Postgres)
        } else {
            None
        }
    }

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

    /// Sessions in the slots of the JSON array `$1`, as `n` (by the slot index).
    pub(super) fn count_sessions_query(self) -> &'static str {
        match self {
            Backend::Sqlite => {
                "SELECT COUNT(*) AS n FROM sessions WHERE slot IN (SELECT value FROM json_each($1))"
            }
            Backend::Postgres => {
                "SELECT COUNT(*) AS n FROM sessions \
                 WHERE slot IN (SELECT value::bigint FROM json_array_elements_text($1::json))"
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

    /// SQLite: how the batch's commit syncs, the write lock, the fences of `$1` that hold
    /// (as in `holding_fences_query`) and the sessions' counts after adding `$2` (as in
    /// `count_messages_query`), in one call to the database thread.
    pub(super) fn sqlite_begin_batch(synchronous: Synchronous) -> &'static str {
        macro_rules! begin_batch {
            ($synchronous:literal) => {
                concat!(
                    "PRAGMA synchronous = ",
                    $synchronous,
                    "; BEGIN IMMEDIATE; \
                     SELECT l.slot AS slot, l.owner AS owner, l.epoch AS epoch FROM slot_leases AS l \
                     JOIN jsonb_each($1) AS f ON l.slot = json_extract(f.value, '$.s') \
                      AND l.owner = json_extract(f.value, '$.o') AND l.epoch = json_extract(f.value, '$.e') \
                     WHERE l.released = 0; \
                     UPDATE sessions SET message_count = sessions.message_count + j.n \
                     FROM (SELECT unhex(json_extract(value, '$.i')) AS id, json_extract(value, '$.n') AS n \
                           FROM jsonb_each($2)) AS j \
                     WHERE sessions.session_id = j.id \
                     RETURNING lower(hex(sessions.session_id)) AS id, sessions.message_count AS message_count; ",
                    sqlite_move_activity!("$2")
                )
            };
        }
        match synchronous {
            Synchronous::Full => begin_batch!("FULL"),
            Synchronous::Normal => begin_batch!("NORMAL"),
            Synchronous::Off => begin_batch!("OFF"),
        }
    }

    /// SQLite: a whole batch in one call to the database thread, when every fence holds
    /// and every session exists (nearly always): seqs are numbered by the statements from
    /// the counts they update, so nothing needs reading first. Anything else makes a
    /// statement fail before the commit: a message whose fence does not hold, or whose
    /// session is gone, has no seq (NOT NULL), and a request id kept already breaks the
    /// primary key. The caller rolls back and stages the batch as
    /// [`Self::sqlite_begin_batch`] does.
    ///
    /// `$1`: counts `{i: session hex, n: added, t: time}`; `$2`: messages `{s: session hex,
    /// k, q, r, c, n, t, l: slot, o: owner, e: epoch}`, numbered count − k if their fence
    /// holds and, when `q` is given (a sealed store numbers and seals them first), it is
    /// that seq; `$3`: bounds `{s, q}`,
    /// dropping messages up to count − q; `$4`: new request ids `{s, r, k: turn, b, rb, p,
    /// c, u}`, whose last seq is count − b, and whose reply, when it is in the same batch,
    /// is count − rb; `$5`: replies `{s, r, b, p, c, u}` to ids kept before, whose seq is
    /// count − b; `$6`: the appends' usage (`batch_usage_json`). Only the statements of
    /// the `parts` given run, besides the counts' and the messages'. The script sets how
    /// its commit syncs.
    pub(super) fn sqlite_append_batch(
        synchronous: Synchronous,
        parts: SqliteBatchParts,
    ) -> &'static str {
        static SCRIPTS: [OnceLock<String>; 48] = [const { OnceLock::new() }; 48];
        debug_assert!(parts.0 < 16, "a part without a statement: {parts:?}");
        let index = synchronous as usize * 16 + usize::from(parts.0 & 15);
        SCRIPTS[index].get_or_init(|| {
            let mut script = format!("{}; {SQLITE_BATCH_MESSAGES}", synchronous.pragma());
            for (part, statement) in [
                (SqliteBatchParts::BOUNDS, SQLITE_BATCH_BOUNDS),
                (SqliteBatchParts::IDS, SQLITE_BATCH_IDS),
                (SqliteBatchParts::REPLIES, SQLITE_BATCH_REPLIES),
                (SqliteBatchParts::USAGE, sqlite_save_batch_usage!("$6")),
            ] {
                if parts.0 & part != 0 {
                    script.push_str(statement);
                }
            }
            script.push_str("COMMIT");
            script
        })
    }

    /// PostgreSQL: a whole batch as one statement, which is its own transaction; the same
    /// parameters as [`Self::sqlite_append_batch`] after `$1`, the fences `{s, o, e}`, locked
    /// as in `holding_fences_query`. Its parts all see the snapshot the statement began
    /// with: messages take their seqs from the updated counts that `counted` returns, and
    /// the bounds cannot drop messages of this very batch (the caller stages such a batch).
    pub(super) const POSTGRES_APPEND_BATCH: &'static str = concat!(
        "\
         WITH held AS ( \
             SELECT l.slot, l.owner, l.epoch \
             FROM json_to_recordset($1::json) AS f(s bigint, o text, e bigint) \
             CROSS JOIN LATERAL ( \
                 SELECT slot, owner, epoch FROM slot_leases \
                 WHERE slot = f.s AND owner = f.o AND epoch = f.e AND released = 0 \
                 FOR SHARE) AS l), \
         counted AS ( \
             UPDATE sessions AS s SET message_count = s.message_count + j.n, last_activity_us = ",
        pg_moved_activity!(),
        " \
             FROM json_to_recordset($2::json) AS j(i text, n bigint, t bigint) \
             WHERE s.session_id = decode(j.i, 'hex') \
             RETURNING s.session_id, s.message_count), \
         inserted AS ( \
             INSERT INTO messages (session_id, seq, role, content, name, created_at_us) \
             SELECT decode(m.s, 'hex'), \
                    CASE WHEN EXISTS (SELECT 1 FROM held AS h \
                                      WHERE h.slot = m.l AND h.owner = m.o AND h.epoch = m.e) \
                          AND (m.q IS NULL OR m.q = (SELECT c.message_count FROM counted AS c \
                                                     WHERE c.session_id = decode(m.s, 'hex')) - m.k) \
                         THEN (SELECT c.message_count FROM counted AS c \
                               WHERE c.session_id = decode(m.s, 'hex')) - m.k END, \
                    m.r, m.c, m.n, m.t \
             FROM json_to_recordset($3::json) \
                  AS m(s text, k bigint, q bigint, r text, c text, n text, t bigint, l bigint, o text, e bigint) \
             RETURNING 1), \
         trimmed AS ( \
             DELETE FROM messages AS d WHERE d.ctid = ANY (ARRAY( \
                 SELECT x.ctid FROM json_to_recordset($4::json) AS b(s text, q bigint) \
                 CROSS JOIN LATERAL ( \
                     SELECT ctid FROM messages \
                     WHERE session_id = decode(b.s, 'hex') \
                       AND seq <= (SELECT c.message_count FROM counted AS c \
                                   WHERE c.session_id = decode(b.s, 'hex')) - b.q) AS x)) \
             RETURNING 1), \
         kept AS ( \
             INSERT INTO request_ids (session_id, request_id, turn, last_seq, reply_seq, \
                                      prompt_tokens, completion_tokens, compute_us) \
             SELECT decode(x.s, 'hex'), x.r, x.k, n.message_count - x.b, n.message_count - x.rb, \
                    x.p, x.c, x.u \
             FROM json_to_recordset($5::json) \
                  AS x(s text, r text, k bigint, b bigint, rb bigint, p bigint, c bigint, u bigint) \
             CROSS JOIN LATERAL (SELECT (SELECT c.message_count FROM counted AS c \
                                         WHERE c.session_id = decode(x.s, 'hex')) AS message_count) AS n \
             RETURNING 1), \
         answered AS ( \
             UPDATE request_ids AS q \
             SET reply_seq = (SELECT c.message_count FROM counted AS c \
                              WHERE c.session_id = q.session_id) - y.b, \
                 prompt_tokens = y.p, completion_tokens = y.c, compute_us = y.u \
             FROM json_to_recordset($6::json) AS y(s text, r text, b bigint, p bigint, c bigint, u bigint) \
             WHERE q.session_id = decode(y.s, 'hex') AND q.request_id = y.r \
             RETURNING 1), \
         used AS ( \
             INSERT INTO user_usage_windows (user_id, resource, state, version) \
             SELECT w.u, w.r, w.s, w.v \
             FROM json_to_recordset($7::json) \
                  AS w(u text, r text, s text, v bigint, l bigint, o text, e bigint) \
             WHERE EXISTS (SELECT 1 FROM held AS h WHERE h.slot = w.l AND h.owner = w.o AND h.epoch = w.e) \
             ON CONFLICT (user_id, resource) DO UPDATE SET state = excluded.state, version = excluded.version \
             WHERE excluded.version >= user_usage_windows.version \
             RETURNING 1) \
         SELECT encode(session_id, 'hex') AS id, message_count FROM counted"
    );

    /// SQLite: a batch's writes and its commit in one call to the database thread. `$1`:
    /// messages (as in `insert_messages_query`); `$2`: `{s: session hex, q: seq}`, dropping
    /// each session's messages up to `q`; `$3`: new request ids `{s, r: id, k: turn, l: last
    /// seq}`, a plain insert, so an id kept already fails the batch before its commit; `$4`:
    /// replies `{s, r, q: seq, p, c, u: usage}` completing their turns' ids; `$5`: the
    /// appends' usage (`batch_usage_json`).
    pub(super) const SQLITE_WRITE_AND_COMMIT: &'static str = concat!(
        "INSERT INTO messages (session_id, seq, role, content, name, created_at_us) \
         SELECT unhex(json_extract(value, '$.s')), json_extract(value, '$.q'), \
                json_extract(value, '$.r'), json_extract(value, '$.c'), \
                json_extract(value, '$.n'), json_extract(value, '$.t') \
         FROM jsonb_each($1); \
         DELETE FROM messages WHERE (session_id, seq) IN ( \
             SELECT m.session_id, m.seq FROM jsonb_each($2) AS j JOIN messages AS m \
               ON m.session_id = unhex(json_extract(j.value, '$.s')) \
              AND m.seq <= json_extract(j.value, '$.q')); \
         INSERT INTO request_ids (session_id, request_id, turn, last_seq) \
         SELECT unhex(json_extract(value, '$.s')), json_extract(value, '$.r'), \
                json_extract(value, '$.k'), json_extract(value, '$.l') \
         FROM jsonb_each($3); \
         UPDATE request_ids SET reply_seq = j.q, prompt_tokens = j.p, completion_tokens = j.c, compute_us = j.u \
         FROM (SELECT unhex(json_extract(value, '$.s')) AS s, json_extract(value, '$.r') AS r, \
                      json_extract(value, '$.q') AS q, json_extract(value, '$.p') AS p, \
                      json_extract(value, '$.c') AS c, json_extract(value, '$.u') AS u \
               FROM jsonb_each($4)) AS j \
         WHERE request_ids.session_id = j.s AND request_ids.request_id = j.r; ",
        sqlite_save_batch_usage!("$5"),
        "COMMIT"
    );

    /// Takes the leases of the slots in the JSON array `$1` for owner `$2` at epoch `$3`,
    /// where no newer epoch holds them; returns the slots taken. One statement, however
    /// many slots (the array holds each slot once).
    pub(super) fn acquire_slots_query(self) -> &'static str {
        match self {
            Backend::Sqlite => {
                "INSERT INTO slot_leases (slot, owner, epoch, released) \
                 SELECT value, $2, $3, 0 FROM json_each($1) WHERE true \
                 ON CONFLICT (slot) DO UPDATE SET owner = excluded.owner, epoch = excluded.epoch, released = 0 \
                 WHERE slot_leases.epoch < excluded.epoch \
                    OR (slot_leases.epoch = excluded.epoch AND slot_leases.owner = excluded.owner) \
                 RETURNING slot"
            }
            Backend::Postgres => {
                "INSERT INTO slot_leases (slot, owner, epoch, released) \
                 SELECT value::bigint, $2, $3, 0 FROM json_array_elements_text($1::json) \
                 ON CONFLICT (slot) DO UPDATE SET owner = excluded.owner, epoch = excluded.epoch, released = 0 \
                 WHERE slot_leases.epoch < excluded.epoch \
                    OR (slot_leases.epoch = excluded.epoch AND slot_leases.owner = excluded.owner) \
                 RETURNING slot"
            }
        }
    }

    /// Releases the leases named by the JSON array `$1` of fences `{s: slot, o: owner,
    /// e: epoch}` that are still held as named, in one statement.
    pub(super) fn release_slots_query(self) -> &'static str {
        match self {
            Backend::Sqlite => {
                "UPDATE slot_leases SET released = 1 \
                 FROM (SELECT json_extract(value, '$.s') AS slot, json_extract(value, '$.o') AS owner, \
                              json_extract(value, '$.e') AS epoch FROM json_each($1)) AS f \
                 WHERE slot_leases.slot = f.slot AND slot_leases.owner = f.owner \
                   AND slot_leases.epoch = f.epoch AND slot_leases.released = 0"
            }
            Backend::Postgres => {
                "UPDATE slot_leases SET released = 1 \
                 FROM (SELECT (value->>'s')::bigint AS slot, value->>'o' AS owner, \
                              (value->>'e')::bigint AS epoch FROM json_array_elements($1::json)) AS f \
                 WHERE slot_leases.slot = f.slot AND slot_leases.owner = f.owner \
                   AND slot_leases.epoch = f.epoch AND slot_leases.released = 0"
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
                concat!(
                    "UPDATE sessions SET message_count = sessions.message_count + j.n \
                     FROM (SELECT unhex(json_extract(value, '$.i')) AS id, json_extract(value, '$.n') AS n \
                           FROM json_each($1)) AS j \
                     WHERE sessions.session_id = j.id \
                     RETURNING lower(hex(sessions.session_id)) AS id, sessions.message_count AS message_count; ",
                    sqlite_move_activity!("$1")
                )
            }
            Backend::Postgres => {
                concat!(
                    "UPDATE sessions AS s SET message_count = s.message_count + j.n, last_activity_us = ",
                    pg_moved_activity!(),
                    " FROM json_to_recordset($1::json) AS j(i text, n bigint, t bigint) \
                     WHERE s.session_id = decode(j.i, 'hex') \
                     RETURNING encode(s.session_id, 'hex') AS id, s.message_count AS message_count"
                )
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
                (
                    "quotas",
                    include_str!("../../migrations/sqlite/0006_quotas.sql"),
                ),
                (
                    "sealing",
                    include_str!("../../migrations/sqlite/0007_sealing.sql"),
                ),
                (
                    "usage versions",
                    include_str!("../../migrations/sqlite/0008_usage_versions.sql"),
                ),
                (
                    "messages in write order",
                    include_str!("../../migrations/sqlite/0009_messages_in_write_order.sql"),
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
                (
                    "quotas",
                    include_str!("../../migrations/postgres/0006_quotas.sql"),
                ),
                (
                    "sealing",
                    include_str!("../../migrations/postgres/0007_sealing.sql"),
                ),
                (
                    "usage versions",
                    include_str!("../../migrations/postgres/0008_usage_versions.sql"),
                ),
            ],
        }
    }
}

/// Which parts of [`Backend::sqlite_append_batch`] a batch needs beyond its counts and
/// messages: each part left out is a statement the database thread does not run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct SqliteBatchParts(pub(super) u8);

impl SqliteBatchParts {
    pub(super) const IDS: u8 = 1;
    pub(super) const BOUNDS: u8 = 2;
    pub(super) const REPLIES: u8 = 4;
    pub(super) const USAGE: u8 = 8;
}

const SQLITE_BATCH_MESSAGES: &str = concat!(
    "BEGIN IMMEDIATE; \
     UPDATE sessions SET message_count = sessions.message_count + j.n \
     FROM (SELECT unhex(json_extract(value, '$.i')) AS id, json_extract(value, '$.n') AS n \
           FROM jsonb_each($1)) AS j \
     WHERE sessions.session_id = j.id \
     RETURNING lower(hex(sessions.session_id)) AS id, sessions.message_count AS message_count; ",
    sqlite_move_activity!("$1"),
    "INSERT INTO messages (session_id, seq, role, content, name, created_at_us) \
     SELECT s.session_id, \
            CASE WHEN EXISTS (SELECT 1 FROM slot_leases AS l \
                 WHERE l.slot = json_extract(j.value, '$.l') AND l.owner = json_extract(j.value, '$.o') \
                   AND l.epoch = json_extract(j.value, '$.e') AND l.released = 0) \
                  AND (json_extract(j.value, '$.q') IS NULL \
                       OR json_extract(j.value, '$.q') = s.message_count - json_extract(j.value, '$.k')) \
                 THEN s.message_count - json_extract(j.value, '$.k') END, \
            json_extract(j.value, '$.r'), json_extract(j.value, '$.c'), \
            json_extract(j.value, '$.n'), json_extract(j.value, '$.t') \
     FROM jsonb_each($2) AS j \
     LEFT JOIN sessions AS s ON s.session_id = unhex(json_extract(j.value, '$.s')); "
);

const SQLITE_BATCH_BOUNDS: &str = "DELETE FROM messages WHERE (session_id, seq) IN ( \
         SELECT m.session_id, m.seq FROM jsonb_each($3) AS j \
         JOIN sessions AS s ON s.session_id = unhex(json_extract(j.value, '$.s')) \
         JOIN messages AS m ON m.session_id = s.session_id \
          AND m.seq <= s.message_count - json_extract(j.value, '$.q')); ";

const SQLITE_BATCH_IDS: &str = "INSERT INTO request_ids (session_id, request_id, turn, last_seq, reply_seq, \
                              prompt_tokens, completion_tokens, compute_us) \
     SELECT s.session_id, json_extract(j.value, '$.r'), json_extract(j.value, '$.k'), \
            s.message_count - json_extract(j.value, '$.b'), \
            s.message_count - json_extract(j.value, '$.rb'), json_extract(j.value, '$.p'), \
            json_extract(j.value, '$.c'), json_extract(j.value, '$.u') \
     FROM jsonb_each($4) AS j \
     LEFT JOIN sessions AS s ON s.session_id = unhex(json_extract(j.value, '$.s')); ";

const SQLITE_BATCH_REPLIES: &str = "UPDATE request_ids SET reply_seq = j.q, prompt_tokens = j.p, completion_tokens = j.c, compute_us = j.u \
     FROM (SELECT s.session_id AS s, json_extract(j.value, '$.r') AS r, \
                  s.message_count - json_extract(j.value, '$.b') AS q, \
                  json_extract(j.value, '$.p') AS p, json_extract(j.value, '$.c') AS c, \
                  json_extract(j.value, '$.u') AS u \
           FROM jsonb_each($5) AS j \
           JOIN sessions AS s ON s.session_id = unhex(json_extract(j.value, '$.s'))) AS j \
     WHERE request_ids.session_id = j.s AND request_ids.request_id = j.r; ";

#[cfg(test)]
mod tests {
    use super::*;

    /// Every statement that moves a session's activity with its appends moves it by the
    /// store's step (`ACTIVITY_STEP`, written out in the SQL).
    #[test]
    fn appends_move_the_activity_by_the_step() {
        let step = format!("+ {}", crate::ACTIVITY_STEP.as_micros());
        let statements = [
            Backend::POSTGRES_APPEND_BATCH,
            Backend::Postgres.count_messages_query(),
            Backend::Sqlite.count_messages_query(),
            Backend::sqlite_begin_batch(Synchronous::Full),
            SQLITE_BATCH_MESSAGES,
        ];
        for statement in statements {
            assert!(statement.contains(&step), "{statement}");
        }
    }
}
