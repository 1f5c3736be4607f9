-- Console ports per machine: stable across restarts.
CREATE TABLE machines (
    id TEXT PRIMARY KEY NOT NULL,
    tcp_port INTEGER NOT NULL UNIQUE,
    tcp_port_logs INTEGER NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);

-- Which machine a serial adapter (by its stable path) was last bound to.
CREATE TABLE serial_paths (
    path TEXT PRIMARY KEY NOT NULL,
    machine_id TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);
