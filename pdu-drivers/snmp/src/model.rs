//! The PDU models: default tables and values per vendor MIB.

use std::fmt;
use std::str::FromStr;

use dutgate_pdu_driver::{BuildFn, ConfigError, PduDriver};
use serde::{Deserialize, Deserializer};

/// A numeric OID such as `1.3.6.1.4.1.318.1.1.4.4.2.1.3` (a leading dot is accepted).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Oid(pub Vec<u64>);

impl Oid {
    pub fn child(&self, index: u64) -> Oid {
        let mut v = self.0.clone();
        v.push(index);
        Oid(v)
    }

    pub fn is_prefix_of(&self, other: &[u64]) -> bool {
        other.len() > self.0.len() && other[..self.0.len()] == self.0[..]
    }
}

impl FromStr for Oid {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim().trim_start_matches('.');
        let parts: Result<Vec<u64>, _> = t.split('.').map(str::parse::<u64>).collect();
        match parts {
            Ok(v) if v.len() >= 2 && v[0] <= 2 => Ok(Oid(v)),
            _ => Err(format!(
                "{:?} is not a numeric OID like 1.3.6.1.4.1.318.1.1.4.4.2.1.3",
                s.chars().take(80).collect::<String>()
            )),
        }
    }
}

impl fmt::Display for Oid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for c in &self.0 {
            if !first {
                f.write_str(".")?;
            }
            first = false;
            write!(f, "{c}")?;
        }
        Ok(())
    }
}

impl<'de> Deserialize<'de> for Oid {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A model: a registry name and its defaults (`None`: the config must give it).
pub struct Model {
    pub name: &'static str,
    pub summary: &'static str,
    pub names: Option<&'static str>,
    pub status: Option<&'static str>,
    pub control: Option<&'static str>,
    pub on_value: Option<i64>,
    pub off_value: Option<i64>,
    pub status_on: Option<&'static [i64]>,
    pub status_off: Option<&'static [i64]>,
    pub build: BuildFn,
}

macro_rules! builder {
    ($f:ident, $m:ident) => {
        fn $f(config: yaml_serde::Value) -> Result<Box<dyn PduDriver>, ConfigError> {
            crate::build_model(&$m, config)
        }
    };
}

/// PowerNet-MIB sPDUOutletCtl (AP79xx "MasterSwitch"): 1 on, 2 off, 3 reboot; reads back
/// the same table.
pub static APC_MASTERSWITCH: Model = Model {
    name: "apc_masterswitch",
    summary: "APC MasterSwitch (PowerNet-MIB sPDUOutletCtl), SNMP v1/v2c/v3",
    names: Some("1.3.6.1.4.1.318.1.1.4.4.2.1.4"),
    status: Some("1.3.6.1.4.1.318.1.1.4.4.2.1.3"),
    control: None,
    on_value: Some(1),
    off_value: Some(2),
    status_on: None,
    status_off: None,
    build: build_apc_masterswitch,
};
builder!(build_apc_masterswitch, APC_MASTERSWITCH);

/// PowerNet-MIB rPDU outlet tables: control `rPDUOutletControlOutletCommand`
/// (1 immediateOn, 2 immediateOff), state `rPDUOutletStatusOutletState` (1 on, 2 off).
pub static APC_RPDU2: Model = Model {
    name: "apc_rpdu2",
    summary: "APC rack PDU (PowerNet-MIB rPDUOutletControl/rPDUOutletStatus), SNMP v1/v2c/v3",
    names: Some("1.3.6.1.4.1.318.1.1.12.3.3.1.1.2"),
    status: Some("1.3.6.1.4.1.318.1.1.12.3.5.1.1.4"),
    control: Some("1.3.6.1.4.1.318.1.1.12.3.3.1.1.4"),
    on_value: Some(1),
    off_value: Some(2),
    status_on: None,
    status_off: None,
    build: build_apc_rpdu2,
};
builder!(build_apc_rpdu2, APC_RPDU2);

/// CyberPower PDU41004 (ePDU MIB ePDUOutletControlOutletCommand): 1 on, 2 off.
pub static CYBERPOWER_PDU41004: Model = Model {
    name: "cyberpower_pdu41004",
    summary: "CyberPower PDU41004 (ePDUOutletControl), SNMP v1/v2c/v3",
    names: Some("1.3.6.1.4.1.3808.1.1.3.3.3.1.1.2"),
    status: Some("1.3.6.1.4.1.3808.1.1.3.3.3.1.1.4"),
    control: None,
    on_value: Some(1),
    off_value: Some(2),
    status_on: None,
    status_off: None,
    build: build_cyberpower_pdu41004,
};
builder!(build_cyberpower_pdu41004, CYBERPOWER_PDU41004);

/// CyberPower PDU15SWHVIEC12ATNET (RMCARD205): status table 1 on / 2 off, control table
/// 2 on / 3 off.
pub static CYBERPOWER_PDU15SWHVIEC12ATNET: Model = Model {
    name: "cyberpower_pdu15swhviec12atnet",
    summary: "CyberPower PDU15SWHVIEC12ATNET (RMCARD205), SNMP v1/v2c/v3",
    names: Some("1.3.6.1.4.1.3808.1.1.5.6.3.1.2"),
    status: Some("1.3.6.1.4.1.3808.1.1.5.6.3.1.3"),
    control: Some("1.3.6.1.4.1.3808.1.1.5.6.5.1.3"),
    on_value: Some(2),
    off_value: Some(3),
    status_on: Some(&[1]),
    status_off: Some(&[2]),
    build: build_cyberpower_pdu15,
};
builder!(build_cyberpower_pdu15, CYBERPOWER_PDU15SWHVIEC12ATNET);

/// Any SNMP PDU: every table and value comes from the config.
pub static GENERIC: Model = Model {
    name: "snmp",
    summary: "generic SNMP PDU: names_oid, status_oid, control_oid, on_value, off_value from the config",
    names: None,
    status: None,
    control: None,
    on_value: None,
    off_value: None,
    status_on: None,
    status_off: None,
    build: build_generic,
};
builder!(build_generic, GENERIC);

pub static MODELS: [&Model; 5] = [
    &APC_MASTERSWITCH,
    &APC_RPDU2,
    &CYBERPOWER_PDU41004,
    &CYBERPOWER_PDU15SWHVIEC12ATNET,
    &GENERIC,
];

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn oid_text_round_trips(first in 0u64..=2, rest in proptest::collection::vec(any::<u64>(), 1..20)) {
            let mut v = vec![first];
            v.extend(rest);
            let oid = Oid(v);
            let text = oid.to_string();
            prop_assert_eq!(text.parse::<Oid>().unwrap(), oid.clone());
            prop_assert_eq!(format!(".{text}").parse::<Oid>().unwrap(), oid);
        }

        #[test]
        fn oid_parser_never_panics(s in "\\PC{0,60}") {
            let _ = s.parse::<Oid>();
        }
    }

    #[test]
    fn oids_parse_and_print() {
        let o: Oid = ".1.3.6.1.4.1.318".parse().unwrap();
        assert_eq!(o.to_string(), "1.3.6.1.4.1.318");
        assert_eq!(o.child(7).to_string(), "1.3.6.1.4.1.318.7");
        assert!(o.is_prefix_of(&[1, 3, 6, 1, 4, 1, 318, 1]));
        assert!(!o.is_prefix_of(&[1, 3, 6, 1, 4, 1, 318]));
        assert!("1.3.x".parse::<Oid>().is_err());
        assert!("7".parse::<Oid>().is_err());
        for m in MODELS {
            for oid in [m.names, m.status, m.control].into_iter().flatten() {
                oid.parse::<Oid>().unwrap();
            }
        }
    }
}
