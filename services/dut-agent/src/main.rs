//! `dutgate-dut s3 pull|push DIR SPEC`: mirrors a directory with the job bucket.
//!
//! SPEC is `<endpoint>,<bucket>,<access key>,<secret key>` (the `dutgate.s3=` kernel parameter
//! the job's cmdline carries), e.g. `http://10.0.2.2:9000,job-42,AKID,secret`.

use std::process::ExitCode;

const USAGE: &str =
    "usage: dutgate-dut s3 <pull|push> DIR <endpoint>,<bucket>,<access key>,<secret key>";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some("s3"), Some(verb), Some(dir), Some(spec)) = (
        args.first().map(String::as_str),
        args.get(1).map(String::as_str),
        args.get(2),
        args.get(3),
    ) else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let bucket = match dutgate_dut::BucketSpec::parse(spec) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("dutgate-dut: {e}");
            return ExitCode::from(2);
        }
    };
    let dir = std::path::Path::new(dir);
    let result = match verb {
        "pull" => dutgate_dut::pull(&bucket, dir)
            .map(|n| format!("pulled {n} file(s) into {}", dir.display())),
        "push" => dutgate_dut::push(&bucket, dir)
            .map(|n| format!("pushed {n} file(s) from {}", dir.display())),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(msg) => {
            println!("dutgate-dut: {msg}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dutgate-dut: {e}");
            ExitCode::FAILURE
        }
    }
}
