//! `dutctl completion SHELL` and `dutctl man`: generated from the command-line definition
//! itself (clap_complete, clap_mangen), so they cannot drift from the options. Offline; the
//! Debian package installs both.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use clap_complete::Shell;

#[derive(Args)]
pub struct CompletionArgs {
    /// The shell: bash, zsh, fish, elvish or powershell.
    #[arg(value_enum)]
    shell: Shell,
}

/// The completion script for `args.shell` on stdout.
pub fn completion(args: CompletionArgs, mut cmd: clap::Command) -> anyhow::Result<ExitCode> {
    let mut out = Vec::new();
    clap_complete::generate(args.shell, &mut cmd, "dutctl", &mut out);
    write_stdout(&out)
}

/// The manual page (roff) on stdout: synopsis, options, and the subcommands with what each
/// does (`dutctl <command> --help` has their options).
pub fn man(cmd: clap::Command) -> anyhow::Result<ExitCode> {
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd)
        .render(&mut out)
        .context("rendering the manual page")?;
    write_stdout(&out)
}

fn write_stdout(bytes: &[u8]) -> anyhow::Result<ExitCode> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(bytes)
        .and_then(|()| stdout.flush())
        .context("writing to stdout")?;
    Ok(ExitCode::SUCCESS)
}
