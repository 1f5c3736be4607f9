//! Errors of the storage client and of job bucket handling.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The `s3` config section (or a key file) is unusable.
    #[error("storage config: {0}")]
    Config(String),
    /// The server could not be reached, or the request timed out.
    #[error("{op}: cannot reach the S3 server: {message}")]
    Unreachable { op: &'static str, message: String },
    /// The server answered with an S3 error.
    #[error("{op}: S3 server answered {status} {code}: {message}")]
    Server {
        op: &'static str,
        status: u16,
        code: String,
        message: String,
    },
    /// The server answered something that is not S3.
    #[error("S3 protocol: {0}")]
    Protocol(String),
    /// A body stopped half-way.
    #[error("transfer interrupted: {0}")]
    Transfer(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The initial-state tarball cannot be read as a (gzip-compressed) tar archive.
    #[error("job tarball: {0}")]
    Tarball(String),
    /// A job id that cannot become a bucket name, or an object key that would leave the
    /// download directory.
    #[error("invalid name: {0}")]
    InvalidName(String),
}

impl StorageError {
    pub(crate) fn request(op: &'static str, e: reqwest::Error) -> Self {
        let mut message = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            message.push_str(": ");
            message.push_str(&s.to_string());
            source = s.source();
        }
        if e.is_body() || e.is_decode() {
            return Self::Transfer(message);
        }
        Self::Unreachable { op, message }
    }

    pub(crate) fn transfer(e: reqwest::Error) -> Self {
        Self::Transfer(e.to_string())
    }

    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// The HTTP status of an S3 error answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Server { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// True for errors worth retrying (network, timeouts, 5xx).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable { .. } | Self::Transfer(_) => true,
            Self::Server { status, .. } => *status >= 500,
            _ => false,
        }
    }
}
