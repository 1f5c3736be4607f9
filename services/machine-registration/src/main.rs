//! `machine-registration register|check|probe` (see the library docs and docs/machines.md).

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        print!("{}", machine_registration::USAGE);
        return;
    }
    let opts = match machine_registration::parse_args(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!(
                "machine-registration: {e}\n\n{}",
                machine_registration::USAGE
            );
            std::process::exit(2);
        }
    };
    let code = match opts.action {
        machine_registration::Action::Register => machine_registration::register(&opts),
        machine_registration::Action::Check => machine_registration::check(&opts),
        machine_registration::Action::Probe => machine_registration::print_probe(&opts),
    };
    std::process::exit(code);
}
