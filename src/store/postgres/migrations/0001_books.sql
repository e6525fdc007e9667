-- The books of the shared store: the same records the sled store keeps, one table each.
-- Records are kept as JSON (the form sled keeps them in); what SQL must add up or order
-- by has columns of its own. Ids compare as bytes (COLLATE "C"), as sled orders them.

CREATE TABLE users (
    id TEXT COLLATE "C" PRIMARY KEY,
    record JSONB NOT NULL
);

CREATE TABLE keys (
    id TEXT COLLATE "C" PRIMARY KEY,
    record JSONB NOT NULL
);

-- The SHA-256 of a key's current and previous secret → the key.
CREATE TABLE key_hashes (
    hash BYTEA PRIMARY KEY,
    key_id TEXT COLLATE "C" NOT NULL
);
CREATE INDEX key_hashes_by_key ON key_hashes (key_id);

CREATE TABLE counters (
    key_id TEXT COLLATE "C" PRIMARY KEY,
    requests BIGINT NOT NULL,
    prompt_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    images BIGINT NOT NULL
);

CREATE TABLE usage (
    key_id TEXT COLLATE "C" NOT NULL,
    hour BIGINT NOT NULL,
    model TEXT COLLATE "C" NOT NULL,
    requests BIGINT NOT NULL,
    errors BIGINT NOT NULL,
    prompt_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    images BIGINT NOT NULL,
    PRIMARY KEY (key_id, hour, model)
);

-- One row per call, once: by time and request id, and by the reservation of the replica
-- (`origin`) whose journal made it durable.
CREATE TABLE calls (
    at_micros BIGINT NOT NULL,
    request_id TEXT COLLATE "C" NOT NULL,
    key_id TEXT COLLATE "C" NOT NULL,
    origin TEXT COLLATE "C" NOT NULL,
    reservation BIGINT,
    record JSONB NOT NULL,
    PRIMARY KEY (at_micros, request_id)
);
CREATE INDEX calls_by_key ON calls (key_id, at_micros, request_id);
CREATE UNIQUE INDEX calls_by_reservation ON calls (origin, reservation)
    WHERE reservation IS NOT NULL;

CREATE TABLE meta (
    name TEXT COLLATE "C" PRIMARY KEY,
    value BYTEA NOT NULL
);
