-- The scheduler asks every round for the queued jobs past their deadline and for the next
-- deadline: a partial index keeps both from scanning the whole queue.
CREATE INDEX jobs_queued_deadline ON jobs (deadline_ms)
    WHERE state = 'QUEUED' AND deadline_ms IS NOT NULL;
