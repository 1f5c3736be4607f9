-- Machines, their state and their lease (one lease per machine: the lease columns).
CREATE TABLE machines (
    id TEXT PRIMARY KEY NOT NULL,
    base_name TEXT NOT NULL,
    name_index BIGINT NOT NULL,
    full_name TEXT NOT NULL UNIQUE,
    tags TEXT NOT NULL,
    manual_tags TEXT NOT NULL,
    ip_address TEXT,
    local_tty_device TEXT,
    pdu TEXT,
    pdu_port_id TEXT,
    pdu_off_delay REAL NOT NULL,
    state TEXT NOT NULL,
    comment TEXT,
    first_seen BIGINT NOT NULL,
    last_seen BIGINT NOT NULL,
    consecutive_infra_failures BIGINT NOT NULL DEFAULT 0,
    training_failures BIGINT NOT NULL DEFAULT 0,
    training_next_at BIGINT,
    trained_at BIGINT,
    lease_id TEXT UNIQUE,
    lease_job_id TEXT,
    lease_holder TEXT,
    lease_purpose TEXT,
    lease_acquired_at BIGINT,
    lease_expires_at BIGINT,
    lease_ttl BIGINT,
    version BIGINT NOT NULL DEFAULT 0,
    UNIQUE (pdu, pdu_port_id)
);
CREATE INDEX machines_lease_expiry ON machines (lease_expires_at);

CREATE TABLE machine_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    machine_id TEXT NOT NULL,
    at BIGINT NOT NULL,
    from_state TEXT NOT NULL,
    to_state TEXT NOT NULL,
    kind TEXT NOT NULL,
    actor TEXT NOT NULL,
    reason TEXT NOT NULL,
    job_id TEXT
);
CREATE INDEX machine_events_machine ON machine_events (machine_id, seq);

CREATE TABLE training_runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    machine_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    ended_at BIGINT,
    outcome TEXT NOT NULL,
    boot_loops BIGINT NOT NULL,
    qualifying BIGINT NOT NULL,
    passes BIGINT NOT NULL DEFAULT 0,
    failures BIGINT NOT NULL DEFAULT 0,
    reason TEXT
);
CREATE INDEX training_runs_machine ON training_runs (machine_id, id);

CREATE TABLE training_loops (
    run_id BIGINT NOT NULL,
    n BIGINT NOT NULL,
    job_kind TEXT NOT NULL,
    job_id TEXT,
    status TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    duration_ms BIGINT NOT NULL,
    failed_stage TEXT,
    console_log_url TEXT,
    detail TEXT,
    PRIMARY KEY (run_id, n)
);

-- At most one discovery at a time: the row with id 1.
CREATE TABLE discovery (
    id BIGINT PRIMARY KEY NOT NULL CHECK (id = 1),
    pdu TEXT NOT NULL,
    port_id TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    timeout REAL NOT NULL
);
