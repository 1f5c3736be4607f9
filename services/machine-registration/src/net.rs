//! The boot NIC: the interface of the default route (else the first one that is up), its MAC
//! address from `/sys/class/net` and its IPv4 address from `getifaddrs` (no NSS involved).

use std::ffi::CStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

/// The default route's interface from `/proc/net/route`, else the first interface that is up
/// and not loopback.
pub fn default_interface(root: &Path) -> Option<String> {
    if let Ok(table) = std::fs::read_to_string(root.join("proc/net/route")) {
        for line in table.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 2 && f[1] == "00000000" {
                return Some(f[0].to_string());
            }
        }
    }
    let mut names: Vec<String> = std::fs::read_dir(root.join("sys/class/net"))
        .ok()?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n != "lo")
        .collect();
    names.sort();
    names.into_iter().find(|n| {
        std::fs::read_to_string(root.join("sys/class/net").join(n).join("operstate"))
            .is_ok_and(|s| s.trim() == "up")
    })
}

/// `aa:bb:cc:dd:ee:ff` of `iface`.
pub fn mac_of(root: &Path, iface: &str) -> Option<String> {
    let s = std::fs::read_to_string(root.join("sys/class/net").join(iface).join("address")).ok()?;
    let s = s.trim().to_ascii_lowercase();
    (s.len() == 17 && s != "00:00:00:00:00:00").then_some(s)
}

/// The first address of `iface`, IPv4 preferred.
pub fn ip_of(iface: &str) -> Option<IpAddr> {
    let mut v4: Option<IpAddr> = None;
    let mut v6: Option<IpAddr> = None;
    // SAFETY: getifaddrs allocates a list we only read and then free with freeifaddrs; every
    // pointer is checked for null, and sockaddrs are read per their family.
    unsafe {
        let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
        if libc::getifaddrs(&mut list) != 0 {
            return None;
        }
        let mut cur = list;
        while !cur.is_null() {
            let ifa = &*cur;
            cur = ifa.ifa_next;
            if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
                continue;
            }
            if CStr::from_ptr(ifa.ifa_name).to_bytes() != iface.as_bytes() {
                continue;
            }
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET if v4.is_none() => {
                    let sa = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    v4 = Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr))));
                }
                libc::AF_INET6 if v6.is_none() => {
                    let sa = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    let ip = Ipv6Addr::from(sa.sin6_addr.s6_addr);
                    if !ip.is_unicast_link_local() {
                        v6 = Some(IpAddr::V6(ip));
                    }
                }
                _ => {}
            }
        }
        libc::freeifaddrs(list);
    }
    v4.or(v6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_route_interface() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("proc/net")).unwrap();
        std::fs::write(
            dir.path().join("proc/net/route"),
            "Iface\tDestination\tGateway\nenp1s0\t000200C0\t00000000\neth7\t00000000\t010200C0\n",
        )
        .unwrap();
        assert_eq!(default_interface(dir.path()).as_deref(), Some("eth7"));
        assert!(ip_of("lo").is_some());
    }
}
