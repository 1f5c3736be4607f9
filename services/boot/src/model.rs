//! Boot configs: what a machine boots (the REST bodies and the stored form).

use dutgate_core::{ApiError, MachineId};
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::openapi::{RefOr, Schema};
use utoipa::{PartialSchema, ToSchema};

/// What to boot: a kernel with its command line and initramfs images, all by URL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BootConfig {
    pub kernel: Kernel,
    /// Initramfs images, loaded in order (one object is accepted as a list of one).
    #[serde(default, deserialize_with = "one_or_many")]
    pub initramfs: Vec<Artifact>,
    /// The job this config belongs to (set by the executor; shown on the console and used by
    /// `DELETE ?job_id=` so that a late teardown cannot clear the next job's config).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Kernel {
    pub url: String,
    /// The kernel command line, passed byte for byte. A list is joined with single spaces.
    #[serde(default, deserialize_with = "string_or_list")]
    pub cmdline: String,
    /// Expected sha256 (hex) of the kernel; the download is refused when it differs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// A boot config as stored for one machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StoredBootConfig {
    pub mac: MachineId,
    #[serde(flatten)]
    #[schema(schema_with = stored_fields)]
    pub config: BootConfig,
    /// Unix time in milliseconds.
    pub updated_at: i64,
}

/// [`BootConfig`]'s schema without `additionalProperties: false`: a request refuses unknown
/// fields, but here its fields come with `mac` and `updated_at`.
fn stored_fields() -> RefOr<Schema> {
    let mut schema = BootConfig::schema();
    if let RefOr::T(Schema::Object(o)) = &mut schema {
        o.additional_properties = None;
    }
    schema
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Artifact>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(Artifact),
        Many(Vec<Artifact>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(a) => vec![a],
        OneOrMany::Many(v) => v,
    })
}

fn string_or_list<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum StringOrList {
        One(String),
        Many(Vec<String>),
    }
    Ok(match StringOrList::deserialize(d)? {
        StringOrList::One(s) => s,
        StringOrList::Many(v) => v.join(" "),
    })
}

pub const MAX_INITRAMFS: usize = 16;
pub const MAX_CMDLINE_BYTES: usize = 64 * 1024;
pub const MAX_JOB_ID_CHARS: usize = 200;

impl BootConfig {
    /// Checks what can be checked without the network; errors name the offending field.
    /// URL schemes and `file://` roots are checked by the artifact cache.
    pub fn validate(&self) -> Result<(), ApiError> {
        if self.kernel.cmdline.len() > MAX_CMDLINE_BYTES {
            return Err(ApiError::unprocessable(format!(
                "the command line is longer than {MAX_CMDLINE_BYTES} bytes"
            ))
            .with_field("kernel.cmdline"));
        }
        crate::ipxe::escape_cmdline(&self.kernel.cmdline)
            .map_err(|e| ApiError::unprocessable(e.to_string()).with_field("kernel.cmdline"))?;
        if self.initramfs.len() > MAX_INITRAMFS {
            return Err(ApiError::unprocessable(format!(
                "at most {MAX_INITRAMFS} initramfs images"
            ))
            .with_field("initramfs"));
        }
        check_sha(&self.kernel.sha256, "kernel.sha256")?;
        for (i, a) in self.initramfs.iter().enumerate() {
            check_sha(&a.sha256, &format!("initramfs[{i}].sha256"))?;
        }
        if let Some(job) = &self.job_id
            && (job.is_empty() || job.chars().count() > MAX_JOB_ID_CHARS)
        {
            return Err(ApiError::unprocessable(format!(
                "job_id must have 1 to {MAX_JOB_ID_CHARS} characters"
            ))
            .with_field("job_id"));
        }
        Ok(())
    }

    /// Every artifact with the name of its field, kernel first.
    pub fn artifacts(&self) -> Vec<(String, &str, Option<&str>)> {
        let mut out = vec![(
            "kernel.url".to_string(),
            self.kernel.url.as_str(),
            self.kernel.sha256.as_deref(),
        )];
        for (i, a) in self.initramfs.iter().enumerate() {
            out.push((
                format!("initramfs[{i}].url"),
                a.url.as_str(),
                a.sha256.as_deref(),
            ));
        }
        out
    }
}

fn check_sha(sha: &Option<String>, field: &str) -> Result<(), ApiError> {
    match sha {
        Some(s) if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Err(ApiError::unprocessable("sha256 must be 64 hexadecimal digits").with_field(field))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valve_infra_shapes() {
        let c: BootConfig = serde_json::from_str(
            r#"{"kernel": {"url": "http://x/k", "cmdline": ["a=1", "b=\"2 3\""]},
                "initramfs": {"url": "http://x/i"}, "job_id": "42"}"#,
        )
        .unwrap();
        assert_eq!(c.kernel.cmdline, "a=1 b=\"2 3\"");
        assert_eq!(c.initramfs.len(), 1);
        c.validate().unwrap();
        assert!(
            serde_json::from_str::<BootConfig>(r#"{"kernel": {"url": "u", "cmd": ""}}"#).is_err()
        );
    }

    #[test]
    fn validation_names_the_field() {
        let mut c: BootConfig =
            serde_json::from_str(r#"{"kernel": {"url": "http://x/k", "cmdline": "x=${y}"}}"#)
                .unwrap();
        let e = c.validate().unwrap_err();
        assert_eq!(e.body.field.as_deref(), Some("kernel.cmdline"));
        c.kernel.cmdline.clear();
        c.initramfs.push(Artifact {
            url: "http://x/i".into(),
            sha256: Some("zz".into()),
        });
        assert_eq!(
            c.validate().unwrap_err().body.field.as_deref(),
            Some("initramfs[0].sha256")
        );
    }
}
