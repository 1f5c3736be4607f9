//! `MachineId`: a machine is named by its boot NIC's MAC address.
//!
//! Accepted spellings: `aa:bb:cc:dd:ee:ff`, `aa-bb-cc-dd-ee-ff`, `aabbccddeeff`, any case.
//! The canonical form is lower case with colons; it is what every service stores and prints.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MachineId([u8; 6]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid machine id {input:?}: expected a MAC address like 52:54:00:12:34:56")]
pub struct InvalidMachineId {
    pub input: String,
}

impl MachineId {
    pub const fn from_bytes(bytes: [u8; 6]) -> Self {
        Self(bytes)
    }

    pub const fn bytes(&self) -> [u8; 6] {
        self.0
    }

    /// Parses one of the accepted spellings; anything else is an error.
    pub fn parse(input: &str) -> Result<Self, InvalidMachineId> {
        let err = || InvalidMachineId {
            input: input.chars().take(64).collect(),
        };
        let s = input.trim();
        let hex_digits: String = match s.len() {
            12 => s.to_string(),
            17 => {
                let bytes = s.as_bytes();
                let sep = bytes[2];
                if sep != b':' && sep != b'-' {
                    return Err(err());
                }
                let mut out = String::with_capacity(12);
                for (i, chunk) in s.split(sep as char).enumerate() {
                    if i >= 6 || chunk.len() != 2 {
                        return Err(err());
                    }
                    out.push_str(chunk);
                }
                out
            }
            _ => return Err(err()),
        };
        if hex_digits.len() != 12 || !hex_digits.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(err());
        }
        let mut bytes = [0u8; 6];
        hex::decode_to_slice(&hex_digits, &mut bytes).map_err(|_| err())?;
        Ok(Self(bytes))
    }
}

impl fmt::Display for MachineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl FromStr for MachineId {
    type Err = InvalidMachineId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Documented as what it serializes to: the MAC address, lower-case and colon-separated.
impl utoipa::PartialSchema for MachineId {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::Type::String)
            .pattern(Some("^[0-9a-f]{2}(:[0-9a-f]{2}){5}$"))
            .examples(["52:54:00:12:34:56"])
            .into()
    }
}
impl utoipa::ToSchema for MachineId {}

impl Serialize for MachineId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MachineId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_the_three_spellings() {
        for s in [
            "52:54:00:12:34:56",
            "52-54-00-12-34-56",
            "525400123456",
            "52:54:00:12:34:56".to_uppercase().as_str(),
        ] {
            assert_eq!(
                MachineId::parse(s).unwrap().to_string(),
                "52:54:00:12:34:56"
            );
        }
    }

    #[test]
    fn rejects_garbage() {
        for s in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:5g",
            "52:54-00:12:34:56",
            "5254001234567",
            "52:54:00:12:34:56:",
            "::::::::::::::::",
            "52::4:00:12:34:56",
            "ééééééééééééééééé",
        ] {
            assert!(MachineId::parse(s).is_err(), "{s:?} was accepted");
        }
    }

    fn spell(bytes: [u8; 6], style: u8, upper: bool) -> String {
        let parts: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let s = match style % 3 {
            0 => parts.join(":"),
            1 => parts.join("-"),
            _ => parts.concat(),
        };
        if upper { s.to_uppercase() } else { s }
    }

    proptest! {
        #[test]
        fn round_trips_every_accepted_form(bytes in any::<[u8; 6]>(), style in 0u8..3, upper in any::<bool>()) {
            let id = MachineId::parse(&spell(bytes, style, upper)).unwrap();
            prop_assert_eq!(id.bytes(), bytes);
            let canonical = id.to_string();
            prop_assert_eq!(MachineId::parse(&canonical).unwrap(), id);
            prop_assert_eq!(canonical.len(), 17);
            prop_assert_eq!(canonical.to_lowercase(), canonical.clone());
        }

        #[test]
        fn never_panics_and_only_accepts_macs(s in ".{0,40}") {
            if let Ok(id) = MachineId::parse(&s) {
                let hex: String = s.trim().chars().filter(|c| c.is_ascii_hexdigit()).collect();
                prop_assert_eq!(hex.to_lowercase(), id.to_string().replace(':', ""));
            }
        }

        #[test]
        fn serde_round_trip(bytes in any::<[u8; 6]>()) {
            let id = MachineId::from_bytes(bytes);
            let json = serde_json::to_string(&id).unwrap();
            prop_assert_eq!(serde_json::from_str::<MachineId>(&json).unwrap(), id);
        }
    }
}
