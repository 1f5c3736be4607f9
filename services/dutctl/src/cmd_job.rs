//! `dutctl job validate FILE [--var k=v]…`: checks a job description offline, the way the
//! executor will: render the template, parse, validate. Prints the normalised job (defaults
//! filled in, `continue` completed) and exits 0, or prints every error on stderr, one per line
//! as `FILE:LINE:COLUMN: field.path: message`, and exits 65 (EX_DATAERR: distinct from
//! the job statuses 0–6 `dutctl run` exits with).

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use dutgate_jobspec::{JobSpec, TemplateVars};

use crate::output::{self, Format};

/// Exit code of `validate` for an invalid job (usage and I/O errors use dutctl's usual code).
pub const EXIT_INVALID: u8 = 65;

#[derive(Subcommand)]
pub enum JobCommand {
    /// Render, parse and validate a job description; print it normalised, or its errors.
    Validate(ValidateArgs),
}

#[derive(Args)]
pub struct ValidateArgs {
    /// The job file (`-` reads standard input).
    file: PathBuf,
    /// A template variable, `name=value`; repeatable. Overrides the placeholder values.
    #[arg(long = "var", value_name = "NAME=VALUE", value_parser = parse_var)]
    vars: Vec<(String, String)>,
    /// Do not provide placeholder values for the standard variables (machine_id, minio_url,
    /// job_bucket, …): only the `--var` ones are defined.
    #[arg(long)]
    no_placeholders: bool,
}

fn parse_var(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("expected NAME=VALUE, got {s:?}")),
    }
}

pub fn run(cmd: JobCommand, format: Format) -> anyhow::Result<ExitCode> {
    match cmd {
        JobCommand::Validate(args) => validate(args, format),
    }
}

fn validate(args: ValidateArgs, format: Format) -> anyhow::Result<ExitCode> {
    let (name, text) = read_job(&args.file)?;
    let mut vars = if args.no_placeholders {
        TemplateVars::default()
    } else {
        TemplateVars::placeholders()
    };
    for (k, v) in args.vars {
        vars.set(k, v);
    }
    match JobSpec::parse_and_render(&text, &vars) {
        Ok(job) => {
            let format = if format == Format::Text {
                Format::Yaml
            } else {
                format
            };
            output::print(format, &job, |_| String::new());
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) => {
            for e in &errors {
                match e.location {
                    Some(loc) => eprintln!("{name}:{loc}: {}: {}", e.field(), e.message),
                    None => eprintln!("{name}: {}: {}", e.field(), e.message),
                }
            }
            Ok(ExitCode::from(EXIT_INVALID))
        }
    }
}

fn read_job(path: &PathBuf) -> anyhow::Result<(String, String)> {
    if path.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read the job from standard input")?;
        return Ok(("<stdin>".into(), text));
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok((path.display().to_string(), text))
}
