-- Calls answered by the response cache, counted apart in the hourly usage (issue 20).
-- Older rows had no cache: zero is their true count.
ALTER TABLE usage ADD COLUMN cache_hits BIGINT NOT NULL DEFAULT 0;
