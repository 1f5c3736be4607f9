//! Errors in the OCI distribution spec's shape: `{"errors":[{"code","message","detail"}]}`.
//!
//! The registry API speaks the spec's bodies (not the gateway's usual `{"error": …}`) because
//! its clients are container tools (skopeo, podman, containerd) that parse exactly that.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::reference::ParseError;

/// The spec's error codes (plus `UNAVAILABLE` and `TAG_INVALID` from the distribution project).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Code {
    BlobUnknown,
    DigestInvalid,
    ManifestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    SizeInvalid,
    TagInvalid,
    Unauthorized,
    Denied,
    Unsupported,
    Toomanyrequests,
    Unavailable,
    Unknown,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::BlobUnknown => "BLOB_UNKNOWN",
            Code::DigestInvalid => "DIGEST_INVALID",
            Code::ManifestInvalid => "MANIFEST_INVALID",
            Code::ManifestUnknown => "MANIFEST_UNKNOWN",
            Code::NameInvalid => "NAME_INVALID",
            Code::NameUnknown => "NAME_UNKNOWN",
            Code::SizeInvalid => "SIZE_INVALID",
            Code::TagInvalid => "TAG_INVALID",
            Code::Unauthorized => "UNAUTHORIZED",
            Code::Denied => "DENIED",
            Code::Unsupported => "UNSUPPORTED",
            Code::Toomanyrequests => "TOOMANYREQUESTS",
            Code::Unavailable => "UNAVAILABLE",
            Code::Unknown => "UNKNOWN",
        }
    }
}

/// One error of an [`OciErrors`] body.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct OciError {
    pub code: Code,
    pub message: String,
    /// `null`, or an object naming what is at fault (`{"digest": …}`, `{"reference": …}`).
    #[schema(value_type = Value)]
    pub detail: serde_json::Value,
}

/// Every error answer of the `/v2/` API (the OCI distribution spec's shape).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct OciErrors {
    pub errors: Vec<OciError>,
}

/// One registry API error: an HTTP status, a spec code, a sentence and a detail object.
#[derive(Debug, Clone)]
pub struct RegistryError {
    pub status: StatusCode,
    pub code: Code,
    pub message: String,
    pub detail: serde_json::Value,
    /// `Content-Range: bytes */<size>` for 416 answers.
    pub content_range_size: Option<u64>,
}

impl RegistryError {
    pub fn new(status: StatusCode, code: Code, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            detail: serde_json::Value::Null,
            content_range_size: None,
        }
    }

    pub fn with_detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = detail;
        self
    }

    pub fn unsupported(what: impl Into<String>) -> Self {
        Self::new(StatusCode::METHOD_NOT_ALLOWED, Code::Unsupported, what)
    }

    pub fn blob_unknown(digest: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            Code::BlobUnknown,
            "blob unknown to registry",
        )
        .with_detail(serde_json::json!({ "digest": digest.to_string() }))
    }

    pub fn manifest_unknown(reference: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            Code::ManifestUnknown,
            "manifest unknown",
        )
        .with_detail(serde_json::json!({ "reference": reference.to_string() }))
    }

    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(error = %detail, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            Code::Unknown,
            "internal error; see the registry service log",
        )
    }
}

impl std::fmt::Display for RegistryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code.as_str(),
            self.message
        )
    }
}

impl std::error::Error for RegistryError {}

impl From<ParseError> for RegistryError {
    fn from(e: ParseError) -> Self {
        let (status, code) = match &e {
            ParseError::Name(_) => (StatusCode::BAD_REQUEST, Code::NameInvalid),
            ParseError::Tag(_) => (StatusCode::BAD_REQUEST, Code::TagInvalid),
            ParseError::Digest(_) | ParseError::Algorithm(_) => {
                (StatusCode::BAD_REQUEST, Code::DigestInvalid)
            }
            ParseError::Route(_) => (StatusCode::NOT_FOUND, Code::NameUnknown),
        };
        RegistryError::new(status, code, e.to_string())
    }
}

impl IntoResponse for RegistryError {
    fn into_response(self) -> Response {
        let body = OciErrors {
            errors: vec![OciError {
                code: self.code,
                message: self.message,
                detail: self.detail,
            }],
        };
        let mut resp = (self.status, axum::Json(body)).into_response();
        let headers = resp.headers_mut();
        headers.insert(
            "Docker-Distribution-API-Version",
            HeaderValue::from_static("registry/2.0"),
        );
        if let Some(size) = self.content_range_size
            && let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}"))
        {
            headers.insert(header::CONTENT_RANGE, v);
        }
        resp
    }
}
