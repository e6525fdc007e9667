-- The audit log: every admin change, by a time-ordered id (`aud_…`), the record as JSON.
CREATE TABLE audit (
    id TEXT COLLATE "C" PRIMARY KEY,
    record JSONB NOT NULL
);
