-- The job queue and job records. Timestamps are unix milliseconds; JSON is TEXT.
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    external_id TEXT,
    state TEXT NOT NULL,
    phase TEXT,
    status TEXT,
    reason TEXT,
    priority BIGINT NOT NULL DEFAULT 0,
    purpose TEXT NOT NULL DEFAULT 'job',
    job_yaml TEXT NOT NULL,
    target_id TEXT,
    target_tags TEXT NOT NULL,
    deadline_ms BIGINT,
    submitted_at BIGINT NOT NULL,
    dispatched_at BIGINT,
    started_at BIGINT,
    finished_at BIGINT,
    machine_id TEXT,
    lease_id TEXT,
    executor TEXT,
    pid BIGINT,
    boots BIGINT NOT NULL DEFAULT 0,
    cancel_requested BIGINT NOT NULL DEFAULT 0,
    has_tarball BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX jobs_queue ON jobs (state, priority DESC, id);
CREATE INDEX jobs_machine ON jobs (machine_id, id);

CREATE TABLE job_events (
    job_id BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    at BIGINT NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);
