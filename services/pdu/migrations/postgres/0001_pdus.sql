-- PDUs added over REST (config-declared ones live in the config file).
CREATE TABLE pdus (
    name TEXT PRIMARY KEY NOT NULL,
    driver TEXT NOT NULL,
    config TEXT NOT NULL,          -- driver config, JSON
    reserved TEXT NOT NULL,        -- JSON array of port ids
    labels TEXT NOT NULL,          -- JSON object port id -> label
    poll_interval_seconds DOUBLE PRECISION,
    created_at BIGINT NOT NULL
);

-- Admin changes to a port (label, reserved), for config-declared and REST PDUs alike.
CREATE TABLE port_settings (
    pdu TEXT NOT NULL,
    port_id TEXT NOT NULL,
    label TEXT,
    reserved BIGINT,               -- 0/1, NULL = not set here
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (pdu, port_id)
);

-- Observed state changes and power events of each port, newest last.
CREATE TABLE port_history (
    id BIGSERIAL PRIMARY KEY,
    pdu TEXT NOT NULL,
    port_id TEXT NOT NULL,
    at BIGINT NOT NULL,            -- unix ms
    state TEXT NOT NULL,           -- ON / OFF / UNKNOWN
    event TEXT NOT NULL,           -- observed / set / cycle / cycle_failed
    detail TEXT
);
CREATE INDEX port_history_port ON port_history (pdu, port_id, id);
