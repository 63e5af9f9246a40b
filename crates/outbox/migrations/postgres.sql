-- courier-outbox schema, version 1 (PostgreSQL).
CREATE TABLE courier_outbox (
    seq         BIGSERIAL PRIMARY KEY,
    id          BYTEA    NOT NULL,
    kind        SMALLINT NOT NULL,
    name        TEXT     NOT NULL,
    key         BYTEA,
    part        INTEGER  NOT NULL,
    payload     BYTEA    NOT NULL,
    enqueued_us BIGINT   NOT NULL
);
CREATE INDEX courier_outbox_part_seq ON courier_outbox (part, seq);
-- One row per partition: a relay locks the partitions it publishes
-- (FOR UPDATE SKIP LOCKED), so a key's rows are published by one relay at a time.
CREATE TABLE courier_outbox_partitions (part INTEGER PRIMARY KEY);
INSERT INTO courier_outbox_partitions SELECT generate_series(0, 15);
CREATE FUNCTION courier_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('courier_outbox', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER courier_outbox_notify AFTER INSERT ON courier_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION courier_outbox_notify();
CREATE TABLE courier_inbox (
    id           BYTEA  PRIMARY KEY,
    processed_us BIGINT NOT NULL
);
CREATE INDEX courier_inbox_processed ON courier_inbox (processed_us);
