-- Per-machine boot configs set by jobs. `config` is the BootConfig as JSON.
CREATE TABLE boot_configs (
    mac        TEXT PRIMARY KEY NOT NULL,
    config     TEXT NOT NULL,
    job_id     TEXT,
    updated_at BIGINT NOT NULL
);
