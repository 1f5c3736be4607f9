//! Who may read a machine's job boot script.
//!
//! A job's script carries the job's credentials on the kernel command line, so it is served
//! only to the machine itself (or an admin). A DUT is recognised by the address its request
//! comes from: the machine's recorded address in mars (what it registered with), or the
//! gateway's neighbour table (`/proc/net/arp`) mapping that address to the machine's MAC.
//! Anyone else asking for that MAC gets the default script, and the mismatch is logged.

use std::net::IpAddr;
use std::time::Duration;

use dutgate_core::MachineId;
use dutgate_core::outbound::canonical;
use dutgate_mars::client::MarsClient;
use ipnet::IpNet;

/// Where the kernel publishes the IPv4 neighbour table.
pub const ARP_TABLE: &str = "/proc/net/arp";

/// Longest wait for mars' answer; iPXE is waiting for its script meanwhile.
const MARS_TIMEOUT: Duration = Duration::from_secs(3);

/// How a peer was recognised as the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Match {
    /// Its address is the machine's recorded address in mars.
    Recorded,
    /// The neighbour table maps its address to the machine's MAC.
    Neighbour,
    /// It is on one of `boot.unverified_peer_networks`.
    Unverified,
}

impl Match {
    pub fn as_str(self) -> &'static str {
        match self {
            Match::Recorded => "recorded_address",
            Match::Neighbour => "neighbour_table",
            Match::Unverified => "unverified_peer_network",
        }
    }
}

/// Decides whether a peer address is a machine.
#[derive(Clone)]
pub struct PeerCheck {
    pub mars: MarsClient,
    pub arp_table: std::path::PathBuf,
    pub unverified: Vec<IpNet>,
}

impl PeerCheck {
    pub async fn matches(&self, mac: MachineId, peer: IpAddr) -> Result<Match, String> {
        let peer = canonical(peer);
        if self.unverified.iter().any(|n| n.contains(&peer)) {
            return Ok(Match::Unverified);
        }
        if let Ok(text) = tokio::fs::read_to_string(&self.arp_table).await
            && arp_lookup(&text, peer) == Some(mac)
        {
            return Ok(Match::Neighbour);
        }
        let recorded = tokio::time::timeout(MARS_TIMEOUT, self.mars.machine(mac)).await;
        match recorded {
            Ok(Ok(m)) => match m.ip_address.map(canonical) {
                Some(ip) if ip == peer => Ok(Match::Recorded),
                Some(ip) => Err(format!("its recorded address is {ip}")),
                None => Err("it has no recorded address".into()),
            },
            Ok(Err(e)) => Err(format!("cannot read its record from mars: {e}")),
            Err(_) => Err(format!(
                "mars did not answer within {} s",
                MARS_TIMEOUT.as_secs()
            )),
        }
    }
}

/// The MAC the neighbour table (`/proc/net/arp` format) holds for `ip`, if a complete entry.
pub fn arp_lookup(table: &str, ip: IpAddr) -> Option<MachineId> {
    let IpAddr::V4(v4) = ip else { return None };
    table.lines().skip(1).find_map(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        // IP address, HW type, Flags, HW address, Mask, Device; flag 0x2 = complete.
        let [addr, _hw, flags, mac, ..] = cols.as_slice() else {
            return None;
        };
        let complete =
            u32::from_str_radix(flags.trim_start_matches("0x"), 16).is_ok_and(|f| f & 0x2 != 0);
        (complete && addr.parse::<std::net::Ipv4Addr>().ok() == Some(v4))
            .then(|| MachineId::parse(mac).ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "IP address       HW type     Flags       HW address            Mask     Device\n\
        10.42.0.17       0x1         0x2         52:54:00:12:34:56     *        br0\n\
        10.42.0.18       0x1         0x0         00:00:00:00:00:00     *        br0\n\
        10.42.0.19       0x1         0x2         garbage               *        br0\n";

    #[test]
    fn neighbour_table() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            arp_lookup(TABLE, ip("10.42.0.17")),
            Some(MachineId::parse("52:54:00:12:34:56").unwrap())
        );
        assert_eq!(arp_lookup(TABLE, ip("10.42.0.18")), None);
        assert_eq!(arp_lookup(TABLE, ip("10.42.0.19")), None);
        assert_eq!(arp_lookup(TABLE, ip("10.42.0.20")), None);
        assert_eq!(arp_lookup(TABLE, ip("::1")), None);
        assert_eq!(arp_lookup("", ip("10.42.0.17")), None);
    }
}
