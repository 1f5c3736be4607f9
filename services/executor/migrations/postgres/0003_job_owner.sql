-- Who submitted each job (the name of the token used). Jobs from before owners were recorded
-- were all submitted with the shared user token, hence the default.
ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT 'user';
