//! Raw request paths from the network: the parser must never panic, and whatever it accepts
//! must be safe to turn into file names and upstream URLs.
#![no_main]

use dutgate_registry::reference::{Digest, Reference, RepoName, V2Route, parse_v2_path};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let _ = RepoName::parse(s);
    let _ = Reference::parse(s);
    let _ = Digest::parse(s);
    let path = format!("/v2/{s}");
    let Ok(route) = parse_v2_path(&path) else {
        return;
    };
    let name = match &route {
        V2Route::Manifest { name, .. }
        | V2Route::Blob { name, .. }
        | V2Route::Upload { name }
        | V2Route::TagsList { name } => name,
        V2Route::Base | V2Route::Catalog => return,
    };
    let n = name.as_str();
    assert!(n.len() <= 255);
    assert!(!n.contains('%') && !n.contains(".."));
    assert!(n.split('/').all(|c| !c.is_empty() && c != "."));
    match route {
        V2Route::Manifest { reference: Reference::Tag(t), .. } => {
            assert!(!t.as_str().contains('/') && !t.as_str().starts_with('.'));
        }
        V2Route::Manifest { reference: Reference::Digest(d), .. } | V2Route::Blob { digest: d, .. } => {
            assert_eq!(d.hex().len(), 64);
            assert!(d.hex().bytes().all(|b| b.is_ascii_hexdigit()));
        }
        _ => {}
    }
});
