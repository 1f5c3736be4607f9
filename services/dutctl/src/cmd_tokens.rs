//! `dutctl tokens create|list|revoke`: the gateway's named tokens (admins only; the
//! executor's `/api/v1/tokens`).
//!
//! A token's value is printed once, by `create`, and nowhere else: `list` and `revoke` show
//! names, roles and dates.

use anyhow::Context;
use clap::Subcommand;
use dutgate_core::ServiceName;
use dutgate_core::auth::{Role, TokenInfo};
use dutgate_core::http::encode_component;
use dutgate_executor::tokens::TokenList;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::gateway::Gateway;
use crate::output::{Format, print};

#[derive(Subcommand)]
pub enum TokensCommand {
    /// Create a named token and print it (once: the gateway keeps only its digest).
    Create {
        /// 1-64 characters of a-z, 0-9, '-', '_', '.', '@' (e.g. a person's login).
        name: String,
        /// runner (an automated submitter), user (a person), service (the gateway's own
        /// actors), admin (everything).
        #[arg(long)]
        role: Role,
        /// Days until the token stops working (1-3650); unset: it never expires.
        #[arg(long, value_name = "DAYS")]
        expires: Option<u32>,
    },
    /// The named tokens: name, role, dates, creator (never the tokens).
    List,
    /// Revoke a named token: every service refuses it from its next request.
    Revoke { name: String },
}

#[derive(Serialize)]
struct CreateRequest<'a> {
    name: &'a str,
    role: Role,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_days: Option<u32>,
}

/// The answer to a creation: the token's record and the token.
#[derive(Debug, Serialize, Deserialize)]
struct Created {
    #[serde(flatten)]
    info: TokenInfo,
    token: String,
}

fn rfc3339(t: OffsetDateTime) -> String {
    // Seconds are enough to read; the JSON output keeps the full value.
    let t = t.replace_nanosecond(0).unwrap_or(t);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

fn expiry(t: Option<OffsetDateTime>) -> String {
    t.map_or_else(|| "never".to_string(), rfc3339)
}

pub async fn run(cmd: TokensCommand, gw: &Gateway, format: Format) -> anyhow::Result<()> {
    let exec = gw.client(ServiceName::Executor);
    match cmd {
        TokensCommand::Create {
            name,
            role,
            expires,
        } => {
            let req = CreateRequest {
                name: &name,
                role,
                expires_days: expires,
            };
            let created: Created = exec
                .post("/api/v1/tokens", &req)
                .await
                .with_context(|| format!("cannot create token {name:?}"))?;
            match format {
                // The token alone on stdout, so `$(dutctl tokens create …)` is the token.
                Format::Text => {
                    eprintln!(
                        "created token {:?}: role {}, expires {}",
                        created.info.name,
                        created.info.role,
                        expiry(created.info.expires_at)
                    );
                    println!("{}", created.token);
                }
                _ => print(format, &created, |_| String::new()),
            }
        }
        TokensCommand::List => {
            let list: TokenList = exec
                .get("/api/v1/tokens")
                .await
                .context("cannot list tokens")?;
            print(format, &list.tokens, |tokens| {
                let mut s = format!(
                    "{:<24}  {:<7}  {:<20}  {:<20}  CREATED BY\n",
                    "NAME", "ROLE", "CREATED", "EXPIRES"
                );
                for t in tokens {
                    s.push_str(&format!(
                        "{:<24}  {:<7}  {:<20}  {:<20}  {}\n",
                        t.name,
                        t.role.as_str(),
                        rfc3339(t.created_at),
                        expiry(t.expires_at),
                        t.created_by
                    ));
                }
                s
            });
        }
        TokensCommand::Revoke { name } => {
            let info: TokenInfo = exec
                .delete(&format!("/api/v1/tokens/{}", encode_component(&name)))
                .await
                .with_context(|| format!("cannot revoke token {name:?}"))?;
            print(format, &info, |i| {
                format!("revoked token {:?} (role {})\n", i.name, i.role)
            });
        }
    }
    Ok(())
}
