-- A user's usage is written by two paths: with the appends of the user's calls, in their
-- transaction, and by the owner's periodic save of usage that came without an append. Each
-- write carries the owner's version of the user's windows, and an older one never replaces
-- a newer one, whichever commits last.
ALTER TABLE user_usage_windows ADD COLUMN version BIGINT NOT NULL DEFAULT 0;
