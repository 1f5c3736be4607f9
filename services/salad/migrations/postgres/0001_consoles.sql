-- Console ports per machine: stable across restarts.
CREATE TABLE machines (
    id TEXT PRIMARY KEY,
    tcp_port BIGINT NOT NULL UNIQUE,
    tcp_port_logs BIGINT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);

-- Which machine a serial adapter (by its stable path) was last bound to.
CREATE TABLE serial_paths (
    path TEXT PRIMARY KEY,
    machine_id TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);
