//! `Tag`: a hardware or admin label of a machine, e.g. `pci:1002:73bf` or `gpu:amd:navi21`.
//!
//! Tags are matched exactly, so they are kept small and printable: 1–128 characters, no
//! whitespace or control characters.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid tag {input:?}: {reason}")]
pub struct InvalidTag {
    pub input: String,
    pub reason: &'static str,
}

pub const MAX_TAG_LEN: usize = 128;

impl Tag {
    pub fn parse(input: &str) -> Result<Self, InvalidTag> {
        let err = |reason| InvalidTag {
            input: input.chars().take(MAX_TAG_LEN + 8).collect(),
            reason,
        };
        if input.is_empty() {
            return Err(err("a tag cannot be empty"));
        }
        if input.len() > MAX_TAG_LEN {
            return Err(err("a tag is at most 128 bytes long"));
        }
        if input.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(err("a tag cannot contain whitespace or control characters"));
        }
        Ok(Self(input.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Tag {
    type Err = InvalidTag;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Documented as what it serializes to.
impl utoipa::PartialSchema for Tag {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::Type::String)
            .min_length(Some(1))
            .max_length(Some(MAX_TAG_LEN))
            .examples(["amdgpu:codename:NAVI21"])
            .into()
    }
}
impl utoipa::ToSchema for Tag {}

impl Serialize for Tag {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Tag {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_family_key_value_and_rejects_junk() {
        assert!(Tag::parse("pci:1002:73bf").is_ok());
        assert!(Tag::parse("").is_err());
        assert!(Tag::parse("has space").is_err());
        assert!(Tag::parse(&"x".repeat(129)).is_err());
    }
}
