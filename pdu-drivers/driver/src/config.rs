//! Typed driver configs. A driver's `build` receives the YAML value of its `config` key and
//! turns it into its own struct with [`parse_config`], whose errors name the offending field
//! so that `POST /api/v1/pdus` can answer 422 with `field` set.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::PortInfo;

/// A driver config that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", field.as_deref().map(|f| format!("{f}: ")).unwrap_or_default())]
pub struct ConfigError {
    /// Dotted path of the offending key inside the driver config (`v3.auth_password`,
    /// `ports[2]`), when there is one.
    pub field: Option<String>,
    pub message: String,
}

impl ConfigError {
    pub fn new(field: Option<&str>, message: impl Into<String>) -> Self {
        Self {
            field: field.map(str::to_string),
            message: message.into(),
        }
    }

    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: Some(field.into()),
            message: message.into(),
        }
    }

    /// Prefixes the field path (used when a driver config sits under a key of a larger one).
    pub fn within(mut self, parent: &str) -> Self {
        self.field = Some(match self.field {
            Some(f) if f.starts_with('[') => format!("{parent}{f}"),
            Some(f) => format!("{parent}.{f}"),
            None => parent.to_string(),
        });
        self
    }
}

/// Deserialises a driver config, naming the field on error. A missing config (`null`) is
/// read as an empty mapping so that drivers whose keys all have defaults accept it.
pub fn parse_config<T: DeserializeOwned>(value: yaml_serde::Value) -> Result<T, ConfigError> {
    let value = match value {
        yaml_serde::Value::Null => yaml_serde::Value::Mapping(Default::default()),
        v => v,
    };
    serde_path_to_error::deserialize::<_, T>(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = inner.to_string();
        // A missing key is reported against its parent mapping; name the key itself.
        let missing = missing_key(&message);
        let field = match (path.as_str(), missing) {
            ("." | "", Some(k)) => Some(k),
            ("." | "", None) => None,
            (p, Some(k)) => Some(format!("{p}.{k}")),
            (p, None) => Some(p.to_string()),
        };
        ConfigError { field, message }
    })
}

/// The key quoted in serde's "missing field `x`" message.
fn missing_key(message: &str) -> Option<String> {
    if !message.starts_with("missing field") {
        return None;
    }
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(message[start..start + len].to_string())
}

/// The usual way a config lists ports: a count (`ports: 8` → ids `1`…`8`) or labels
/// (`ports: [web, db]` → ids `1`, `2` labelled so).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PortList {
    Count(u16),
    Labels(Vec<String>),
}

/// Expands a [`PortList`] into ports numbered from `first` (1 for most devices, 0 for
/// Shelly's `switch:0`).
pub fn port_list(list: &PortList, first: u16) -> Vec<PortInfo> {
    match list {
        PortList::Count(n) => (0..*n)
            .map(|i| PortInfo::new((first + i).to_string(), None))
            .collect(),
        PortList::Labels(labels) => labels
            .iter()
            .enumerate()
            .map(|(i, l)| PortInfo::new((first as usize + i).to_string(), Some(l.clone())))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        user: String,
        level: u8,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Cfg {
        host: String,
        #[serde(default)]
        port: u16,
        v3: Option<Inner>,
    }

    fn parse(text: &str) -> Result<Cfg, ConfigError> {
        parse_config(yaml_serde::from_str(text).unwrap())
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse("host: a\nport: nope").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("port"), "{e}");
        let e = parse("port: 1").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("host"), "{e}");
        let e = parse("host: a\ncomunity: x").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("comunity"), "{e}");
        let e = parse("host: a\nv3: {user: u, level: 300}").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("v3.level"), "{e}");
        let e = parse("host: a\nv3: {user: u}").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("v3.level"), "{e}");
        assert!(parse("host: a").is_ok());
        assert_eq!(
            ConfigError::field("host", "empty")
                .within("config")
                .to_string(),
            "config.host: empty"
        );
    }

    #[test]
    fn port_lists() {
        let p: PortList = yaml_serde::from_str("3").unwrap();
        assert_eq!(
            port_list(&p, 1)
                .iter()
                .map(|p| p.id.as_str())
                .collect::<Vec<_>>(),
            ["1", "2", "3"]
        );
        let p: PortList = yaml_serde::from_str("[a, b]").unwrap();
        let ports = port_list(&p, 0);
        assert_eq!(ports[1], PortInfo::new("1", Some("b".into())));
    }
}
