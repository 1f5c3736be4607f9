//! The dashboard's access rules over HTTP (docs/dashboard.md, docs/security.md): sign-in and
//! its cookie, the cookie refused by the REST API, CSRF refusals, the console WebSocket's
//! Origin check, `job_visibility`, and admin actions decided by mars with the caller's own
//! token (against a farm of simulated machines).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use dutgate_core::auth::{Auth, Role};
use dutgate_core::config::GatewayConfig;
use dutgate_core::db::Db;
use dutgate_core::{MachineId, Secret};
use dutgate_executor::config::JobVisibility;
use dutgate_executor::model::Purpose;
use dutgate_executor::store::{MIGRATIONS, NewJob, Store};
use dutgate_executor::{Config as ExecConfig, Executor};
use dutgate_mars::model::MachineState;
use reqwest::StatusCode;
use reqwest::header::{COOKIE, ORIGIN, SET_COOKIE};
use tokio_util::sync::CancellationToken;

/// An executor alone (no mars: pages that need it show an error line), with `admin`, `user`
/// and a named user token `alice`.
struct Lone {
    url: String,
    store: Store,
    alice: String,
    http: reqwest::Client,
    _tmp: tempfile::TempDir,
    shutdown: CancellationToken,
}

impl Drop for Lone {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn lone(visibility: JobVisibility) -> Lone {
    let tmp = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut gw = GatewayConfig {
        state_dir: tmp.path().to_path_buf(),
        internal_host: "127.0.0.1".into(),
        public_host: "127.0.0.1".into(),
        ..Default::default()
    };
    gw.ports.executor = port;
    gw.auth.admin_token = Some(Secret::new(ADMIN));
    gw.auth.user_token = Some(Secret::new(USER));
    let auth = Auth::from_gateway_quiet(&gw);
    let alice = auth
        .store()
        .unwrap()
        .create("alice", Role::User, None, "test")
        .unwrap()
        .token;
    let db = Db::open_sqlite(&tmp.path().join("executor.db"), MIGRATIONS)
        .await
        .unwrap();
    let cfg = ExecConfig {
        job_visibility: visibility,
        // Nothing listens there: the scheduler never dispatches, pages show mars' error.
        mars_url: Some("http://127.0.0.1:9".into()),
        pdu_url: Some("http://127.0.0.1:9".into()),
        ..Default::default()
    };
    let shutdown = CancellationToken::new();
    let store = Store::new(db);
    let exec = Executor::start(Arc::new(gw), cfg, store.clone(), auth, shutdown.clone())
        .await
        .unwrap();
    let app = exec
        .router()
        .into_make_service_with_connect_info::<SocketAddr>();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
    });
    Lone {
        url: format!("http://127.0.0.1:{port}"),
        store,
        alice,
        http: no_redirects(),
        _tmp: tmp,
        shutdown,
    }
}

/// An `application/x-www-form-urlencoded` body, as a browser's form sends it.
trait FormPairs {
    fn form_pairs(self, pairs: &[(&str, &str)]) -> Self;
}

impl FormPairs for reqwest::RequestBuilder {
    fn form_pairs(self, pairs: &[(&str, &str)]) -> Self {
        use dutgate_core::http::encode_component as enc;
        let body = pairs
            .iter()
            .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
            .collect::<Vec<_>>()
            .join("&");
        self.header("content-type", "application/x-www-form-urlencoded")
            .body(body)
    }
}

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn queued_job(store: &Store, owner: &str) -> i64 {
    store
        .insert(&NewJob {
            external_id: None,
            priority: 0,
            purpose: Purpose::Job,
            job_yaml: "target: {}\n".into(),
            target_id: None,
            target_tags: vec!["gpu:x".into()],
            deadline_ms: None,
            has_tarball: false,
            owner: owner.into(),
        })
        .await
        .unwrap()
}

/// Signs in with `token`; the session cookie (`name=value`).
async fn sign_in(http: &reqwest::Client, url: &str, token: &str) -> String {
    let r = http
        .post(format!("{url}/ui/login"))
        .header(ORIGIN, url)
        .form_pairs(&[("token", token)])
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::SEE_OTHER,
        "sign-in: {:?}",
        r.text().await
    );
    let set = r.headers()[SET_COOKIE].to_str().unwrap().to_string();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(attr), "cookie without {attr}: {set}");
    }
    assert!(!set.contains(token), "the token itself is in the cookie");
    set.split(';').next().unwrap().to_string()
}

async fn page(http: &reqwest::Client, url: &str, path: &str, cookie: &str) -> (StatusCode, String) {
    let r = http
        .get(format!("{url}{path}"))
        .header(COOKIE, cookie)
        .send()
        .await
        .unwrap();
    (r.status(), r.text().await.unwrap())
}

/// The CSRF token of the session (from a page's sign-out form).
fn csrf_of(html: &str) -> String {
    let at = html.find("name=\"csrf\" value=\"").expect("a csrf field") + 19;
    html[at..].split('"').next().unwrap().to_string()
}

#[tokio::test]
async fn cookie_sign_in_is_for_the_dashboard_only() {
    let ex = lone(JobVisibility::All).await;
    let (url, http) = (&ex.url, &ex.http);
    // A bad token: refused, no cookie.
    let r = http
        .post(format!("{url}/ui/login"))
        .header(ORIGIN, url.as_str())
        .form_pairs(&[("token", "nope")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.headers().get(SET_COOKIE).is_none());
    // A cross-site sign-in form: refused.
    let r = http
        .post(format!("{url}/ui/login"))
        .header(ORIGIN, "http://evil.example")
        .form_pairs(&[("token", ADMIN)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // Pages without a session go to the sign-in page; fragments answer 401.
    let r = http.get(format!("{url}/ui/farm")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(r.headers()["location"], "/ui/login");
    let (st, _) = page(http, url, "/ui/farm/live", "dutgate_session=made-up").await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);

    let cookie = sign_in(http, url, ADMIN).await;
    let (st, html) = page(http, url, "/ui/jobs", &cookie).await;
    assert_eq!(st, StatusCode::OK);
    assert!(html.contains("admin (admin)"), "{html}");
    // The REST API never takes the cookie.
    let (st, _) = page(http, url, "/api/v1/jobs", &cookie).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    // Mars is down: the farm page says so instead of failing.
    let (st, html) = page(http, url, "/ui/farm", &cookie).await;
    assert_eq!(st, StatusCode::OK);
    assert!(html.contains("mars:"), "{html}");

    // Sign-out ends the session on the server.
    let csrf = csrf_of(&html);
    let r = http
        .post(format!("{url}/ui/logout"))
        .header(COOKIE, &cookie)
        .header(ORIGIN, url.as_str())
        .form_pairs(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let (st, _) = page(http, url, "/ui/jobs/live", &cookie).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn state_changes_need_same_origin_and_the_csrf_token() {
    let ex = lone(JobVisibility::All).await;
    let (url, http) = (&ex.url, &ex.http);
    let id = queued_job(&ex.store, "user").await;
    let cookie = sign_in(http, url, ADMIN).await;
    let (_, html) = page(http, url, "/ui/jobs", &cookie).await;
    let csrf = csrf_of(&html);
    let job = id.to_string();
    let post = |origin: Option<&str>, csrf: &str, site: Option<&str>| {
        let mut rb = http
            .post(format!("{url}/ui/action"))
            .header(COOKIE, &cookie)
            .form_pairs(&[("action", "cancel"), ("job", job.as_str()), ("csrf", csrf)]);
        if let Some(o) = origin {
            rb = rb.header(ORIGIN, o);
        }
        if let Some(s) = site {
            rb = rb.header("sec-fetch-site", s);
        }
        rb.send()
    };
    // No CSRF token, a wrong one, another origin, no origin at all, a cross-site fetch.
    for (origin, token, site) in [
        (Some(url.as_str()), "", None),
        (Some(url.as_str()), "0123", None),
        (Some("http://evil.example"), csrf.as_str(), None),
        (None, csrf.as_str(), None),
        (Some(url.as_str()), csrf.as_str(), Some("cross-site")),
    ] {
        let r = post(origin, token, site).await.unwrap();
        assert_eq!(
            r.status(),
            StatusCode::FORBIDDEN,
            "{origin:?} {token:?} {site:?}"
        );
        let body = r.text().await.unwrap();
        assert!(
            body.contains("CSRF") || body.contains("rigin") || body.contains("cross-site"),
            "{body}"
        );
    }
    let row = ex.store.get(id).await.unwrap().unwrap();
    assert!(
        row.finished_at.is_none(),
        "a refused request changed the job"
    );
    // The real form: done.
    let r = post(Some(url.as_str()), &csrf, Some("same-origin"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.text().await.unwrap().contains("is being cancelled"));
}

#[tokio::test]
async fn console_websocket_checks_origin_with_the_cookie() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let ex = lone(JobVisibility::All).await;
    let (url, http) = (&ex.url, &ex.http);
    let id = queued_job(&ex.store, "user").await;
    let cookie = sign_in(http, url, ADMIN).await;
    let ws_url = format!(
        "{}/api/v1/jobs/{id}/console/ws",
        url.replace("http:", "ws:")
    );
    let connect = |origin: Option<&str>| {
        let mut req = ws_url.as_str().into_client_request().unwrap();
        req.headers_mut().insert("cookie", cookie.parse().unwrap());
        if let Some(o) = origin {
            req.headers_mut().insert("origin", o.parse().unwrap());
        }
        tokio_tungstenite::connect_async(req)
    };
    for origin in [Some("http://evil.example"), None] {
        match connect(origin).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{origin:?}")
            }
            other => panic!(
                "{origin:?}: expected a refusal, got {:?}",
                other.map(|_| ())
            ),
        }
    }
    let (ws, resp) = connect(Some(url))
        .await
        .expect("the WebSocket with the page's origin");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    drop(ws);
    // A stale cookie is not a session.
    let mut req = ws_url.as_str().into_client_request().unwrap();
    req.headers_mut()
        .insert("cookie", "dutgate_session=gone".parse().unwrap());
    req.headers_mut().insert("origin", url.parse().unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), StatusCode::UNAUTHORIZED)
        }
        other => panic!("expected 401, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn users_see_what_job_visibility_allows() {
    // `owner`: alice sees her jobs only.
    let ex = lone(JobVisibility::Owner).await;
    let (url, http) = (&ex.url, &ex.http);
    let hers = queued_job(&ex.store, "alice").await;
    let theirs = queued_job(&ex.store, "user").await;
    let cookie = sign_in(http, url, &ex.alice).await;
    let (st, html) = page(http, url, "/ui/jobs/live", &cookie).await;
    assert_eq!(st, StatusCode::OK);
    assert!(html.contains(&format!("data-id=\"{hers}\"")), "{html}");
    assert!(!html.contains(&format!("data-id=\"{theirs}\"")), "{html}");
    let (st, html) = page(http, url, "/ui/queue/live", &cookie).await;
    assert_eq!(st, StatusCode::OK);
    assert!(!html.contains(&format!("data-id=\"{theirs}\"")), "{html}");
    let (st, html) = page(http, url, &format!("/ui/jobs/{theirs}"), &cookie).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    assert!(html.contains("job_visibility"), "{html}");
    let (st, html) = page(http, url, &format!("/ui/jobs/{hers}"), &cookie).await;
    assert_eq!(st, StatusCode::OK);
    assert!(html.contains("data-writable=\"true\""), "{html}");
    // The admin sees both.
    let admin = sign_in(http, url, ADMIN).await;
    let (_, html) = page(http, url, "/ui/jobs/live", &admin).await;
    assert!(
        html.contains(&format!("data-id=\"{theirs}\""))
            && html.contains(&format!("data-id=\"{hers}\""))
    );
    drop(ex);

    // `all`: alice reads another user's job, read-only, and may not cancel it.
    let ex = lone(JobVisibility::All).await;
    let (url, http) = (&ex.url, &ex.http);
    let theirs = queued_job(&ex.store, "user").await;
    let cookie = sign_in(http, url, &ex.alice).await;
    let (st, html) = page(http, url, &format!("/ui/jobs/{theirs}"), &cookie).await;
    assert_eq!(st, StatusCode::OK);
    assert!(html.contains("data-writable=\"false\""), "{html}");
    let csrf = csrf_of(&html);
    let r = http
        .post(format!("{url}/ui/action"))
        .header(COOKIE, &cookie)
        .header(ORIGIN, url.as_str())
        .form_pairs(&[
            ("action", "cancel"),
            ("job", &theirs.to_string()),
            ("csrf", &csrf),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("only its owner or an admin")
    );
}

/// Against a farm: the farm page shows the machines, an admin retires and activates one from
/// the page's forms, and a user's retire is refused by mars with its own sentence.
#[tokio::test]
async fn admin_actions_are_decided_by_mars_with_the_callers_token() {
    let farm = Farm::start(Options {
        machines: 2,
        ..options()
    })
    .await;
    let http = no_redirects();
    let url = &farm.url;
    let admin = sign_in(&http, url, ADMIN).await;
    let (st, html) = page(&http, url, "/ui/farm", &admin).await;
    assert_eq!(st, StatusCode::OK);
    for n in 1..=2 {
        let row = format!("data-id=\"{}\" data-state=\"IDLE\"", mac(n));
        assert!(html.contains(&row), "{row} not in {html}");
    }
    let csrf = csrf_of(&html);
    let m1 = mac(1).to_string();
    let act = |cookie: &str, csrf: &str, action: &str| {
        http.post(format!("{url}/ui/action"))
            .header(COOKIE, cookie)
            .header(ORIGIN, url.as_str())
            .form_pairs(&[("action", action), ("machine", m1.as_str()), ("csrf", csrf)])
            .send()
    };
    // The confirmation step names what will happen.
    let (st, html) = page(
        &http,
        url,
        &format!("/ui/confirm?action=retire&machine={m1}"),
        &admin,
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert!(html.contains(&format!("Retire machine {m1}")), "{html}");

    let user = sign_in(&http, url, USER).await;
    let (_, html) = page(&http, url, "/ui/farm", &user).await;
    let r = act(&user, &csrf_of(&html), "retire").await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let body = r.text().await.unwrap();
    assert!(
        body.contains("mars refused") && body.contains("admin"),
        "{body}"
    );

    let r = act(&admin, &csrf, "retire").await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{:?}", r.text().await);
    let deadline = Instant::now() + Duration::from_secs(5);
    let retired = format!("data-id=\"{m1}\" data-state=\"RETIRED\"");
    loop {
        let (_, html) = page(&http, url, "/ui/farm/live", &admin).await;
        if html.contains(&retired) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the farm page never showed {m1} RETIRED: {html}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Activation goes through mars' quick check (no trainer in this farm): out of RETIRED.
    let r = act(&admin, &csrf, "activate").await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        r.text()
            .await
            .unwrap()
            .contains(&format!("machine {m1} is now"))
    );
    let m = farm
        .mars
        .machine(MachineId::parse(&m1).unwrap())
        .await
        .unwrap();
    assert_ne!(m.state, MachineState::Retired);
    farm.stop().await;
}
