-- Each session's double-text policy: enqueue, reject or interrupt.
ALTER TABLE sessions ADD COLUMN double_text TEXT NOT NULL DEFAULT 'enqueue';
