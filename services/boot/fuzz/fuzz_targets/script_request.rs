//! Request URIs from DUTs (`/boot/{mac}/boot.ipxe?…`, `/boot.ipxe?mac=…`): decoding never
//! panics, and what reaches a script cannot break out of its line.
#![no_main]

use dutgate_boot::api::parse_script_request;
use dutgate_boot::ipxe::{render_retry_script, sanitize_echo};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    for candidate in [format!("/boot/{s}/boot.ipxe"), format!("/boot.ipxe?{s}"), s.to_string()] {
        let Ok(uri) = candidate.parse::<http::Uri>() else {
            continue;
        };
        let req = parse_script_request(&uri);
        for word in [&req.platform, &req.buildarch].into_iter().flatten() {
            assert!(word.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'));
        }
        let echo = sanitize_echo(&req.raw_mac);
        assert!(!echo.contains(['\n', '\r', '$', ';', '#', '\\']));
        let script = render_retry_script(&req.raw_mac, "http://gw/retry", 10);
        assert_eq!(script.lines().filter(|l| l.starts_with("echo ")).count(), 2);
    }
});
