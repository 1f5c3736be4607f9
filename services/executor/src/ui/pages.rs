//! The dashboard's HTML (maud escapes every value). Each page has a `…_live` fragment that
//! `dashboard.js` swaps in; element ids and `data-state` attributes are what the browser
//! test and the benchmark look for.

use axum::http::StatusCode;
use maud::{DOCTYPE, Markup, html};

use super::{ActionForm, FarmView, JobFilter, JobView, MachineView, QueueView, UiCaller};
use crate::model::{Job, JobState};
use dutgate_core::ApiError;
use dutgate_core::http::encode_component;

/// Content-Security-Policy of every page: scripts and styles only from the gateway
/// (xterm.js sets inline styles on its own elements), no framing, forms only to itself.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
     img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; form-action 'self'; \
     base-uri 'none'";

fn now_ms() -> i64 {
    crate::store::now_ms()
}

fn when(ms: i64) -> String {
    let fmt = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| t.format(&fmt).ok())
        .map(|s| format!("{s} UTC"))
        .unwrap_or_default()
}

/// `3 s`, `4 min 05 s`, `2 h 10 min`.
fn span(ms: i64) -> String {
    let s = (ms.max(0) / 1000) as u64;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {:02} s", s / 60, s % 60),
        _ => format!("{} h {:02} min", s / 3600, (s % 3600) / 60),
    }
}

fn ago(ms: i64) -> String {
    format!("{} ago", span(now_ms() - ms))
}

fn layout(
    caller: Option<&UiCaller>,
    title: &str,
    current: &str,
    console: bool,
    body: Markup,
) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · dutgate" }
                link rel="stylesheet" href="/ui/assets/dashboard.css";
                @if console {
                    link rel="stylesheet" href="/ui/assets/xterm.css";
                    script src="/ui/assets/xterm.js" {}
                }
                script src="/ui/assets/dashboard.js" defer {}
            }
            body {
                header {
                    strong { "dutgate" }
                    @if let Some(c) = caller {
                        @for (href, name) in [("/ui/farm", "Farm"), ("/ui/queue", "Queue"), ("/ui/jobs", "Jobs")] {
                            a href=(href) class=[(name == current).then_some("current")] { (name) }
                        }
                        span.who #who data-role=(c.who.role.as_str()) { (c.who.name) " (" (c.who.role.as_str()) ")" }
                        form method="post" action="/ui/logout" {
                            input type="hidden" name="csrf" value=(c.session.csrf.expose());
                            button type="submit" #sign-out { "Sign out" }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

pub fn login_page(error: Option<&str>) -> Markup {
    layout(
        None,
        "Sign in",
        "",
        false,
        html! {
            h1 { "Sign in" }
            @if let Some(e) = error { p.error #error { (e) } }
            p { "Paste your dutgate token (" code { "dutctl tokens create" } ", or the gateway's bootstrap tokens). It is kept by the gateway for this session only; the browser gets an HttpOnly session cookie." }
            form method="post" action="/ui/login" {
                input type="password" name="token" #token autocomplete="off" size="72" required;
                " "
                button type="submit" #sign-in { "Sign in" }
            }
        },
    )
}

pub fn error_page(caller: &UiCaller, status: StatusCode, message: &str) -> Markup {
    layout(
        Some(caller),
        "Refused",
        "",
        false,
        html! {
            h1 { (status.as_u16()) " " (status.canonical_reason().unwrap_or("")) }
            p.error #error { (message) }
            p { a href="/ui/farm" { "Back to the farm" } }
        },
    )
}

pub fn done_page(caller: &UiCaller, message: &str, back: &str) -> Markup {
    layout(
        Some(caller),
        "Done",
        "",
        false,
        html! {
            h1 { "Done" }
            p.notice #done { (message) }
            p { a href=(back) #back { "Back" } }
        },
    )
}

fn confirm_link(action: &str, params: &[(&str, &str)], label: &str) -> Markup {
    let mut q = format!("action={}", encode_component(action));
    for (k, v) in params {
        q.push_str(&format!("&{k}={}", encode_component(v)));
    }
    html! { a href={ "/ui/confirm?" (q) } data-action=(action) { (label) } }
}

pub fn confirm_page(caller: &UiCaller, a: &ActionForm, text: &str) -> Markup {
    layout(
        Some(caller),
        "Confirm",
        "",
        false,
        html! {
            h1 { "Confirm" }
            p #question { (text) }
            form method="post" action="/ui/action" {
                input type="hidden" name="csrf" value=(caller.session.csrf.expose());
                input type="hidden" name="action" value=(a.action);
                input type="hidden" name="machine" value=(a.machine);
                input type="hidden" name="pdu" value=(a.pdu);
                input type="hidden" name="port" value=(a.port);
                input type="hidden" name="job" value=(a.job);
                button type="submit" #confirm { "Confirm" }
                " "
                a href="/ui/farm" { "Cancel" }
            }
        },
    )
}

// ---- farm -------------------------------------------------------------------------------

pub fn farm_page(caller: &UiCaller, v: &FarmView) -> Markup {
    layout(
        Some(caller),
        "Farm",
        "Farm",
        false,
        html! {
            h1 { "Farm" }
            div #farm data-live="/ui/farm/live" { (farm_live(caller, v)) }
        },
    )
}

fn machine_row(mv: &MachineView) -> Markup {
    let m = &mv.m;
    let id = m.id.to_string();
    let state = m.state.to_string();
    html! {
        tr.machine id={ "machine-" (id.replace(':', "")) } data-id=(id) data-state=(state) {
            td { (m.full_name) br; span.tags { (id) } }
            td.state.{ "state-" (state) } { (state) }
            td.tags { @for t in m.all_tags() { (t.as_str()) br; } }
            td { (m.pdu_port_id.as_deref().unwrap_or("—")) }
            td { @match mv.power {
                Some(p) => span.{ "power-" (p.as_str()) } { (p.as_str()) },
                None => "—",
            } }
            td { @match &m.lease {
                Some(l) => @if l.job_id.parse::<i64>().is_ok() {
                    a href={ "/ui/jobs/" (l.job_id) } { "job " (l.job_id) }
                } @else { (l.job_id) },
                None => "—",
            } }
            td {
                @if m.training.is_active || !mv.loops.is_empty() {
                    (m.training.current_loop_count) "/" (m.training.boot_loop_counts)
                    @for (n, status, stage) in &mv.loops {
                        br;
                        "loop " (n) ": " (status)
                        @if let Some(st) = stage { " (" (st.as_str()) ")" }
                    }
                } @else { "—" }
            }
            td { (ago(m.last_seen.0)) }
            td.actions {
                @let mac = id.as_str();
                @if m.state == dutgate_mars::model::MachineState::Retired {
                    (confirm_link("activate", &[("machine", mac)], "activate"))
                } @else {
                    (confirm_link("retire", &[("machine", mac)], "retire"))
                }
                @if let (Some(pdu), Some(port)) = (m.pdu.as_deref(), m.pdu_port_id.as_deref()) {
                    (confirm_link("port-on", &[("pdu", pdu), ("port", port)], "on"))
                    (confirm_link("port-off", &[("pdu", pdu), ("port", port)], "off"))
                    (confirm_link("port-cycle", &[("pdu", pdu), ("port", port)], "cycle"))
                }
            }
        }
    }
}

pub fn farm_live(_caller: &UiCaller, v: &FarmView) -> Markup {
    html! {
        @for e in &v.errors { p.error { (e) } }
        @if v.groups.is_empty() && v.errors.is_empty() { p { "No machines and no PDUs yet." } }
        @for g in &v.groups {
            h2 { @match &g.name { Some(n) => { "PDU " (n) }, None => "Machines without a known PDU" } }
            @if let Some(e) = &g.error { p.error { (e) } }
            @if !g.machines.is_empty() {
                table.machines {
                    tr { th { "Machine" } th { "State" } th { "Tags" } th { "Port" } th { "Power" } th { "Current job" } th { "Training" } th { "Last seen" } th { "Actions" } }
                    @for mv in &g.machines { (machine_row(mv)) }
                }
            }
            @if let (Some(pdu), false) = (&g.name, g.free_ports.is_empty()) {
                details {
                    summary { (g.free_ports.len()) " port(s) with no machine" }
                    table {
                        tr { th { "Port" } th { "Power" } th { "Actions" } }
                        @for (port, power) in &g.free_ports {
                            tr {
                                td { (port) }
                                td.{ "power-" (power.as_str()) } { (power.as_str()) }
                                td.actions {
                                    (confirm_link("discover", &[("pdu", pdu), ("port", port)], "discover"))
                                    (confirm_link("port-on", &[("pdu", pdu), ("port", port)], "on"))
                                    (confirm_link("port-off", &[("pdu", pdu), ("port", port)], "off"))
                                    (confirm_link("port-cycle", &[("pdu", pdu), ("port", port)], "cycle"))
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

// ---- queue ------------------------------------------------------------------------------

pub fn queue_page(caller: &UiCaller, v: &QueueView) -> Markup {
    layout(
        Some(caller),
        "Queue",
        "Queue",
        false,
        html! {
            h1 { "Queue" }
            div #queue data-live="/ui/queue/live" { (queue_live(caller, v)) }
        },
    )
}

fn target(j: &Job) -> Markup {
    html! {
        @if let Some(id) = j.target.id { "machine " (id) br; }
        span.tags { @for t in &j.target.tags { (t) br; } }
    }
}

pub fn queue_live(_caller: &UiCaller, v: &QueueView) -> Markup {
    html! {
        @for e in &v.errors { p.error { (e) } }
        p #queue-size { (v.jobs.len()) " job(s) waiting" }
        @if !v.jobs.is_empty() {
            table {
                tr { th { "Job" } th { "Priority" } th { "Target" } th { "Waiting" } th { "Owner" } }
                @for j in &v.jobs {
                    tr.job data-id=(j.id) {
                        td { a href={ "/ui/jobs/" (j.id) } { (j.id) } }
                        td { (j.priority) }
                        td { (target(j)) }
                        td { (span(now_ms() - j.submitted_at.0)) }
                        td { (j.owner) }
                    }
                }
            }
        }
        h2 { "Targets with no free machine" }
        @if v.starved.is_empty() { p { "None: every waiting job has an IDLE machine it can take." } }
        @else {
            ul #starved {
                @for tags in &v.starved {
                    li.tags { @if tags.is_empty() { "(any machine)" } @else { (tags.join(", ")) } }
                }
            }
        }
    }
}

// ---- jobs -------------------------------------------------------------------------------

pub fn jobs_page(
    caller: &UiCaller,
    f: &JobFilter,
    query: &str,
    list: &Result<Vec<Job>, ApiError>,
) -> Markup {
    layout(
        Some(caller),
        "Jobs",
        "Jobs",
        false,
        html! {
            h1 { "Jobs" }
            form.filters method="get" action="/ui/jobs" {
                label { "state " select name="state" {
                    option value="" { "any" }
                    @for st in JobState::ALL {
                        option value=(st.as_str()) selected[f.state.eq_ignore_ascii_case(st.as_str())] { (st.as_str()) }
                    }
                } } " "
                label { "owner " input name="owner" value=(f.owner); } " "
                label { "machine " input name="machine_id" value=(f.machine_id); } " "
                label { "tag " input name="tag" value=(f.tag); } " "
                button type="submit" { "Filter" }
            }
            div #jobs data-live={ "/ui/jobs/live?" (query) } { (jobs_live(caller, list)) }
        },
    )
}

pub fn jobs_live(_caller: &UiCaller, list: &Result<Vec<Job>, ApiError>) -> Markup {
    html! {
        @match list {
            Err(e) => p.error { (e.body.error) },
            Ok(jobs) => table {
                tr { th { "Job" } th { "State" } th { "Phase" } th { "Machine" } th { "Target" } th { "Owner" } th { "Submitted" } }
                @for j in jobs {
                    @let word = super::job_state_word(j);
                    tr.job data-id=(j.id) data-state=(word) {
                        td { a href={ "/ui/jobs/" (j.id) } { (j.id) } }
                        td.state.{ "state-" (word) } { (word) }
                        td { (j.phase.as_deref().unwrap_or("")) }
                        td { @if let Some(m) = j.machine_id { (m) } }
                        td { (target(j)) }
                        td { (j.owner) }
                        td { (when(j.submitted_at.0)) }
                    }
                }
            },
        }
    }
}

pub fn job_page(caller: &UiCaller, v: &JobView) -> Markup {
    let id = v.job.id;
    layout(
        Some(caller),
        &format!("Job {id}"),
        "Jobs",
        true,
        html! {
            h1 { "Job " (id) }
            div #job data-live={ "/ui/jobs/" (id) "/live" } { (job_live(caller, v)) }
            h2 { "Console" }
            p #console-status { "connecting…" }
            div #console data-ws={ "/api/v1/jobs/" (id) "/console/ws" } data-writable=(v.writable) {}
            @if !v.writable { p { "Read-only: only the job's owner and admins type into its console." } }
        },
    )
}

pub fn job_live(_caller: &UiCaller, v: &JobView) -> Markup {
    let j = &v.job;
    let word = super::job_state_word(j);
    html! {
        table.summary {
            tr { th { "State" } td.state.{ "state-" (word) } #job-state data-state=(word) { (word) } }
            tr { th { "Phase" } td #job-phase { (j.phase.as_deref().unwrap_or("—")) } }
            @if let Some(r) = &j.reason { tr { th { "Reason" } td { (r) } } }
            tr { th { "Machine" } td { @match j.machine_id { Some(m) => (m), None => "—" } } }
            tr { th { "Target" } td { (target(j)) } }
            tr { th { "Owner" } td { (j.owner) } }
            tr { th { "Priority" } td { (j.priority) } }
            tr { th { "Submitted" } td { (when(j.submitted_at.0)) } }
            @if let Some(t) = j.dispatched_at { tr { th { "Dispatched" } td { (when(t.0)) } } }
            @if let Some(t) = j.started_at { tr { th { "Started" } td { (when(t.0)) } } }
            @if let Some(t) = j.finished_at { tr { th { "Finished" } td { (when(t.0)) " (ran " (span(t.0 - j.started_at.map(|s| s.0).unwrap_or(t.0))) ")" } } }
            tr { th { "Boots" } td { (j.boots) } }
        }
        @if j.state != JobState::Finished && v.writable {
            p.actions { (confirm_link("cancel", &[("job", &j.id.to_string())], "Cancel this job")) }
        }
        h2 { "Events" }
        table.events {
            tr { th { "#" } th { "At" } th { "Kind" } th { "Message" } }
            @for e in &v.events {
                tr { td { (e.seq) } td { (when(e.at.0)) } td { (e.kind) } td { (e.message) } }
            }
        }
        h2 { "Artifacts" }
        ul.artifacts {
            @for a in &v.artifacts {
                li { a href={ "/ui/jobs/" (j.id) "/artifacts/" (a.path) } { (a.path) } " (" (a.size) " bytes)" }
            }
        }
    }
}
