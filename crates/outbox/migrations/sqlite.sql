-- courier-outbox schema, version 1 (SQLite).
CREATE TABLE courier_outbox (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    id          BLOB    NOT NULL,
    kind        INTEGER NOT NULL,
    name        TEXT    NOT NULL,
    key         BLOB,
    part        INTEGER NOT NULL,
    payload     BLOB    NOT NULL,
    enqueued_us INTEGER NOT NULL
);
CREATE TABLE courier_inbox (
    id           BLOB    PRIMARY KEY,
    processed_us INTEGER NOT NULL
);
CREATE INDEX courier_inbox_processed ON courier_inbox (processed_us);
