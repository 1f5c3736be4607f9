//! Errors of a job description: each names the field it is about and where, in the text the
//! user submitted, the problem is. A job can carry several errors at once, so users fix their
//! file in one round trip rather than one error per submission.

use std::fmt;

/// A position in the submitted job text. Both numbers start at 1; the column counts characters,
/// not bytes, as editors do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

impl Default for Location {
    fn default() -> Self {
        Location { line: 1, column: 1 }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// What class of mistake an error is, for callers that map errors onto their own codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum JobErrorKind {
    /// The text is larger than a job may be, or expands to more than that.
    TooLarge,
    /// The Jinja2 template does not render (syntax, undefined variable, runaway loop).
    Template,
    /// The rendered text is not valid YAML.
    Yaml,
    /// A field the schema does not know (usually a typo).
    UnknownField,
    /// A required field is absent.
    MissingField,
    /// A field holds the wrong kind of value (a string where a number is expected, …).
    InvalidType,
    /// A field has the right type but an unacceptable value (bad regex, retries on `overall`, …).
    InvalidValue,
}

/// One problem in a job description.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct JobError {
    pub kind: JobErrorKind,
    /// Dotted path of the field, e.g. `timeouts.overall.retries` or
    /// `deployment.start.kernel.cmdline[2]`; empty for the document as a whole.
    pub path: String,
    pub message: String,
    /// Where the problem is in the submitted text, when it can be pinned down.
    pub location: Option<Location>,
}

impl JobError {
    pub(crate) fn new(
        kind: JobErrorKind,
        path: impl Into<String>,
        message: impl Into<String>,
        location: Option<Location>,
    ) -> Self {
        Self {
            kind,
            path: path.into(),
            message: message.into(),
            location,
        }
    }

    /// The field path, or `(job)` for errors about the whole document.
    pub fn field(&self) -> &str {
        if self.path.is_empty() {
            "(job)"
        } else {
            &self.path
        }
    }
}

impl fmt::Display for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.location {
            Some(loc) => write!(f, "{}: {}: {}", loc, self.field(), self.message),
            None => write!(f, "{}: {}", self.field(), self.message),
        }
    }
}

/// Every problem found in a job description, in the order they appear in the text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct JobErrors(pub Vec<JobError>);

impl JobErrors {
    pub(crate) fn single(error: JobError) -> Self {
        Self(vec![error])
    }

    pub fn iter(&self) -> std::slice::Iter<'_, JobError> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The first error, which API responses put in their single `field/line/column` slot.
    pub fn first(&self) -> Option<&JobError> {
        self.0.first()
    }
}

impl fmt::Display for JobErrors {
    /// One error per line, so a terminal or a log shows them as a list.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl<'a> IntoIterator for &'a JobErrors {
    type Item = &'a JobError;
    type IntoIter = std::slice::Iter<'a, JobError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// An invalid job is the submitter's mistake: 400 (413 when too large), with the first error in
/// the `field`/`line`/`column` slots and every error, one per line, in `error`.
impl From<JobErrors> for dutgate_core::ApiError {
    fn from(errors: JobErrors) -> Self {
        let too_large = errors.iter().any(|e| e.kind == JobErrorKind::TooLarge);
        let message = format!("invalid job:\n{errors}");
        let mut api = if too_large {
            dutgate_core::ApiError::payload_too_large(message)
        } else {
            dutgate_core::ApiError::bad_request(message)
        };
        if let Some(first) = errors.first() {
            if !first.path.is_empty() {
                api = api.with_field(first.path.clone());
            }
            if let Some(loc) = first.location {
                api = api.at(loc.line, loc.column);
            }
        }
        api
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_error_carries_the_first_error() {
        let errors = JobErrors(vec![
            JobError::new(
                JobErrorKind::InvalidValue,
                "timeouts.overall.retries",
                "`overall` cannot have retries",
                Some(Location {
                    line: 4,
                    column: 32,
                }),
            ),
            JobError::new(JobErrorKind::MissingField, "deployment", "missing", None),
        ]);
        let api = dutgate_core::ApiError::from(errors);
        assert_eq!(api.status.as_u16(), 400);
        assert_eq!(api.body.field.as_deref(), Some("timeouts.overall.retries"));
        assert_eq!((api.body.line, api.body.column), (Some(4), Some(32)));
        assert_eq!(api.body.error.lines().count(), 3, "{}", api.body.error);
    }
}
