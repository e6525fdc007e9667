-- The model catalogue: one row per client-facing model, its versions, aliases, rollout
-- and deprecations kept in the record (JSON, as sled keeps it).

CREATE TABLE models (
    name TEXT COLLATE "C" PRIMARY KEY,
    record JSONB NOT NULL
);
