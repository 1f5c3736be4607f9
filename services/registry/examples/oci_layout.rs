//! Writes a seeded OCI image layout (used by `cargo xtask bench registry`):
//! `oci_layout <dir> <tag> <seed> <layer size>[,<layer size>…] [gzip]`
//! prints the top manifest digest and the total blob bytes.

use std::process::ExitCode;

use dutgate_registry::testkit::{ImageSpec, write_image_layout};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: oci_layout <dir> <tag> <seed> <size>[,<size>…] [gzip]";
    let (Some(dir), Some(tag), Some(seed), Some(sizes)) =
        (args.first(), args.get(1), args.get(2), args.get(3))
    else {
        eprintln!("{usage}");
        return ExitCode::from(2);
    };
    let Ok(seed) = seed.parse::<u64>() else {
        eprintln!("{usage}: bad seed {seed:?}");
        return ExitCode::from(2);
    };
    let sizes: Result<Vec<usize>, _> = sizes.split(',').map(str::parse).collect();
    let Ok(sizes) = sizes else {
        eprintln!("{usage}: bad sizes");
        return ExitCode::from(2);
    };
    let gzip = args.get(4).is_some_and(|a| a == "gzip");
    match write_image_layout(
        std::path::Path::new(dir),
        tag,
        &ImageSpec::new(seed, sizes, gzip),
    ) {
        Ok(img) => {
            println!("{} {}", img.top_digest, img.blob_bytes());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("oci_layout: {dir}: {e}");
            ExitCode::FAILURE
        }
    }
}
