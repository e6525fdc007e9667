-- Money: what calls cost (nano-units of the configured currency) in the counters and the
-- hourly usage, the usage of each model version apart, and the prices.

ALTER TABLE counters ADD COLUMN cost BIGINT NOT NULL DEFAULT 0;

ALTER TABLE usage ADD COLUMN version TEXT COLLATE "C" NOT NULL DEFAULT '';
ALTER TABLE usage ADD COLUMN cost BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage DROP CONSTRAINT usage_pkey;
ALTER TABLE usage ADD PRIMARY KEY (key_id, hour, model, version);

-- A model version's prices, one per moment it takes effect.
CREATE TABLE prices (
    model TEXT COLLATE "C" NOT NULL,
    effective_from BIGINT NOT NULL,
    record JSONB NOT NULL,
    PRIMARY KEY (model, effective_from)
);
