//! Kernel command lines from jobs: escaping never panics, and whatever it accepts comes out of
//! (a model of) iPXE's parser byte for byte.
#![no_main]

use dutgate_boot::ipxe::{CmdlineError, escape_cmdline, model};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    match escape_cmdline(s) {
        Ok(e) => {
            let settings = model::settings(&e.set_lines());
            assert_eq!(
                model::kernel_cmdline(&e.text, &settings).as_deref(),
                Some(s.as_bytes())
            );
        }
        Err(CmdlineError::Nul) => assert!(s.contains('\0')),
        Err(CmdlineError::Unrepresentable { word }) => assert!(word.contains("${")),
    }
});
