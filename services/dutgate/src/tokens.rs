//! `dutgate tokens …`: the gateway's tokens, offline, on the gateway itself.
//!
//! `bootstrap` writes the bootstrap tokens (`<state_dir>/tokens/{admin,user,service}`, mode
//! 0600) that `dutgate up` and a package install need before any service runs; it never
//! prints a token (installers keep their output in logs). `create`, `list` and `revoke` work
//! on the same named-token store as `POST /api/v1/tokens` (the services see changes at their
//! next request), for an admin with a shell on the gateway and no token yet.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use dutgate_core::auth::store::new_token;
use dutgate_core::auth::{Role, TokenStore, read_token};
use dutgate_core::config::GatewayConfig;

#[derive(Subcommand)]
pub enum TokensCommand {
    /// Write the bootstrap tokens that are missing (`<state_dir>/tokens/{admin,user,service}`);
    /// prints their paths, never the tokens.
    Bootstrap,
    /// Create a named token and print it (this is the only time it is shown).
    Create(CreateArgs),
    /// List the named tokens (never the tokens themselves).
    List(OutputArgs),
    /// Revoke a named token: every service refuses it from its next request.
    Revoke {
        /// The token's name.
        name: String,
    },
}

#[derive(Args)]
pub struct CreateArgs {
    /// Name of the token (a person, a runner): 1-64 of a-z 0-9 - _ . @
    name: String,
    /// runner, user, service or admin.
    #[arg(long)]
    role: Role,
    /// Days until it stops working (default: never).
    #[arg(long)]
    expires: Option<u32>,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Args)]
pub struct OutputArgs {
    /// Output format: text or json.
    #[arg(short = 'o', long = "output", default_value = "text")]
    output: String,
}

impl OutputArgs {
    fn json(&self) -> anyhow::Result<bool> {
        match self.output.as_str() {
            "text" => Ok(false),
            "json" => Ok(true),
            other => bail!("unknown output format {other:?}: use text or json"),
        }
    }
}

pub fn run(cmd: &TokensCommand, gw: &GatewayConfig) -> anyhow::Result<()> {
    let store = TokenStore::in_state_dir(&gw.state_dir);
    match cmd {
        TokensCommand::Bootstrap => {
            let dir = gw.tokens_dir();
            bootstrap(&dir)?;
            println!(
                "bootstrap tokens in {} (admin, user, service; mode 0600)",
                dir.display()
            );
        }
        TokensCommand::Create(a) => {
            let json = a.output.json()?;
            let created = store.create(&a.name, a.role, a.expires, "offline")?;
            if json {
                println!("{}", serde_json::to_string(&created)?);
            } else {
                let expiry = created
                    .info
                    .expires_at
                    .map(|e| format!(", expires {e}"))
                    .unwrap_or_default();
                eprintln!(
                    "created token {:?} (role {}{expiry}); it is shown only now:",
                    created.info.name, created.info.role
                );
                println!("{}", created.token);
            }
        }
        TokensCommand::List(o) => {
            let tokens = store.list()?;
            if o.json()? {
                println!(
                    "{}",
                    serde_json::to_string(&serde_json::json!({ "tokens": tokens }))?
                );
            } else {
                println!("{:<24} {:<8} {:<26} EXPIRES", "NAME", "ROLE", "CREATED");
                for t in tokens {
                    println!(
                        "{:<24} {:<8} {:<26} {}",
                        t.name,
                        t.role,
                        t.created_at,
                        t.expires_at
                            .map(|e| e.to_string())
                            .unwrap_or("never".into())
                    );
                }
            }
        }
        TokensCommand::Revoke { name } => {
            let t = store.revoke(name)?;
            println!("revoked token {:?} (role {})", t.name, t.role);
        }
    }
    Ok(())
}

/// Creates the bootstrap tokens (mode 0600, directory 0700) that are absent.
pub fn bootstrap(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    for name in ["admin", "user", "service"] {
        let path = dir.join(name);
        if read_token(&path).is_some() {
            continue;
        }
        write_private(&path, &new_token())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn write_private(path: &Path, content: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(content.as_bytes())?;
    f.write_all(b"\n")
}
