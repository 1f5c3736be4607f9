//! `-o text|json|yaml` for every command.

use clap::ValueEnum;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Format {
    #[default]
    Text,
    Json,
    Yaml,
}

/// Prints `value` as JSON/YAML, or calls `text` for the human form.
pub fn print<T: Serialize>(format: Format, value: &T, text: impl FnOnce(&T) -> String) {
    match format {
        Format::Json => match serde_json::to_string_pretty(value) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("dutctl: cannot render JSON: {e}"),
        },
        Format::Yaml => match yaml_serde::to_string(value) {
            Ok(s) => print!("{s}"),
            Err(e) => eprintln!("dutctl: cannot render YAML: {e}"),
        },
        Format::Text => print!("{}", text(value)),
    }
}
