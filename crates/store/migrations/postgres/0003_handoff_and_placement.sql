-- A lease its holder gave up at the end of a handoff: the slot's new owner takes it at
-- once instead of waiting for the handoff to time out. Writes need an unreleased lease.
ALTER TABLE slot_leases ADD COLUMN released BIGINT NOT NULL DEFAULT 0;

-- The coordinator's placement table, so that a restarted coordinator serves the same
-- assignment at a higher epoch. One row; `placement` is JSON.
CREATE TABLE placement (
    singleton BIGINT PRIMARY KEY CHECK (singleton = 1),
    epoch BIGINT NOT NULL,
    placement TEXT NOT NULL
);
