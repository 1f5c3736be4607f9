//! The console attacks of the isolation issue, played against a real salad (and a real mars)
//! with real TCP clients, netconsoles and socat ptys. Loopback addresses other than 127.0.0.1
//! stand for the DUT networks (`127.0.0.2` is the victim DUT, `127.0.0.3` the attacker), so
//! address rules mean something without network namespaces. Each attack is refused and the
//! victim's bytes arrive intact.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use dutgate_core::MachineId;
use dutgate_salad::client::SaladClient;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const VICTIM_IP: &str = "127.0.0.2";
const ATTACKER_IP: &str = "127.0.0.3";

fn nets(list: &[&str]) -> Vec<ipnet::IpNet> {
    list.iter().map(|n| n.parse().unwrap()).collect()
}

/// A TCP connection to `to` whose source address is `from`.
async fn connect_from(from: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(from.parse::<IpAddr>().unwrap(), 0))?;
    let s = sock.connect(to).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// True when the peer closed `s` before sending anything (within the wait budget).
async fn closed_without_data(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 256];
    matches!(
        tokio::time::timeout(WAIT, s.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

/// Salad whose DUT networks are the two "DUT" addresses (and not 127.0.0.1, the gateway).
async fn salad_with_dut_networks(dir: &std::path::Path, config: dutgate_salad::Config) -> Salad {
    let mars = Arc::new(TestMars::start(&dir.join("mars")).await);
    Salad::start_with(
        &dir.join("state"),
        config,
        mars,
        nets(&["127.0.0.2/32", "127.0.0.3/32"]),
    )
    .await
}

fn config(dir: &std::path::Path) -> dutgate_salad::Config {
    test_config(&format!("{}/*-adapter", dir.display()), port_range(40))
}

/// Waits until the stream of `peer` is bound to `machine` (per `/api/v1/ports`).
async fn wait_netconsole_bound(salad: &Salad, peer: SocketAddr, machine: MachineId) {
    let name = format!("netconsole {peer}");
    wait_for(&format!("{name} bound to {machine}"), || async {
        let ports = salad.client.ports().await.ok()?;
        ports
            .ports
            .iter()
            .any(|p| p.name == name && p.machine == Some(machine))
            .then_some(())
    })
    .await
}

/// Waits until `machine` has a refusal whose reason contains `why`.
async fn wait_refusal(
    client: &SaladClient,
    machine: MachineId,
    why: &str,
) -> dutgate_salad::client::Refusal {
    wait_for(
        &format!("a refusal ({why}) recorded on {machine}"),
        || async {
            let list = client.refusals(machine, 0).await.ok()?;
            list.refusals.into_iter().find(|r| r.reason.contains(why))
        },
    )
    .await
}

/// Reads what arrives on `s` for `quiet` after the last byte.
async fn drain(s: &mut TcpStream, quiet: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout(quiet, s.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    got
}

/// Hijack by printing another machine's id, both from another address and from a second
/// stream of the victim's own address; and a bound stream that prints the victim's id. The
/// victim's client, log and input stay the victim's; every refusal is recorded on the victim
/// for its job, which reads them with its lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hijack_by_printing_another_id_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let salad = salad_with_dut_networks(dir.path(), config(dir.path())).await;
    let ingest = salad.handle().netconsole_addr.unwrap();
    let victim = machine(0x2101);
    let attacker = machine(0x2102);
    let lease = salad.mars.running(victim, VICTIM_IP).await;
    let job = salad.client_with(None).with_lease(&lease);
    // The job process attaches to the console first (the lease lets it create the server).
    let console = job.machine(victim).await.unwrap();

    // A RUNNING machine binds only once its lease holder announced the boot.
    let mut early = connect_from(VICTIM_IP, ingest).await.unwrap();
    early
        .write_all(format!("SALAD.machine_id={victim}\n").as_bytes())
        .await
        .unwrap();
    let r = wait_refusal(&salad.client, victim, "no boot of it was announced").await;
    assert_eq!(r.source.as_deref(), Some(VICTIM_IP));
    drop(early);
    let wrong = job
        .clone()
        .with_lease("0123456789abcdef0123456789abcdef")
        .expect(victim)
        .await
        .unwrap_err();
    assert!(wrong.to_string().contains("403"), "{wrong}");
    let user = salad.client_with(Some(USER));
    assert!(
        user.expect(victim)
            .await
            .unwrap_err()
            .to_string()
            .contains("403")
    );
    let anon = salad.client_with(None);
    assert!(
        anon.expect(victim)
            .await
            .unwrap_err()
            .to_string()
            .contains("401")
    );
    job.expect(victim).await.unwrap();

    // The attacker, from its own address, announces the victim first: wrong address.
    let mut spoof = connect_from(ATTACKER_IP, ingest).await.unwrap();
    spoof
        .write_all(format!("SALAD.machine_id={victim}\njob_success\n").as_bytes())
        .await
        .unwrap();
    let r = wait_refusal(&job, victim, "but the machine's address is").await;
    assert_eq!(r.source.as_deref(), Some(ATTACKER_IP));

    // The victim's own console binds.
    let mut dut = connect_from(VICTIM_IP, ingest).await.unwrap();
    let dut_addr = dut.local_addr().unwrap();
    dut.write_all(format!("Command line: SALAD.machine_id={victim} quiet\n").as_bytes())
        .await
        .unwrap();
    wait_netconsole_bound(&salad, dut_addr, victim).await;
    let mut client = salad.connect(console.tcp_port).await;
    say_until_heard(
        &mut dut,
        b"victim: booting\n",
        &mut client,
        "victim console",
    )
    .await;

    // A second stream from the victim's own address: the machine already has its console.
    let mut second = connect_from(VICTIM_IP, ingest).await.unwrap();
    second
        .write_all(format!("SALAD.machine_id={victim}\nsession_end\n").as_bytes())
        .await
        .unwrap();
    wait_refusal(&job, victim, "another console stream is bound").await;

    // A stream bound to another machine (unknown to mars: registering) prints the victim's id.
    let mut other = connect_from(ATTACKER_IP, ingest).await.unwrap();
    let other_addr = other.local_addr().unwrap();
    other
        .write_all(format!("SALAD.machine_id={attacker}\n").as_bytes())
        .await
        .unwrap();
    wait_netconsole_bound(&salad, other_addr, attacker).await;
    other
        .write_all(
            format!("SALAD.machine_id={victim}\njob_success\nmachine_unfit_for_service\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let r = wait_refusal(&job, victim, "only an admin re-binds").await;
    assert_eq!(r.bound_to, Some(attacker));
    assert_eq!(r.claimed, victim);
    // The attacker's own machine records it too.
    wait_refusal(&salad.client, attacker, "only an admin re-binds").await;

    // Both directions stay the victim's: output, then input typed for the victim.
    say_until_heard(
        &mut dut,
        b"victim: still mine\n",
        &mut client,
        "victim console",
    )
    .await;
    client.write_all(b"typed-for-victim\n").await.unwrap();
    read_until(&mut dut, b"typed-for-victim\n", "victim DUT input").await;
    let at_victim = drain(&mut client, Duration::from_millis(300)).await;
    for s in [&mut spoof, &mut second, &mut other] {
        let got = drain(s, Duration::from_millis(300)).await;
        assert!(
            !got.windows(16).any(|w| w == b"typed-for-victim"),
            "another stream received the victim's input: {got:?}"
        );
    }
    let log = wait_for("victim log", || async {
        let s = job
            .log(victim, &dutgate_salad::client::Since::Offset(0), None)
            .await
            .ok()?;
        String::from_utf8_lossy(&s.data)
            .contains("still mine")
            .then_some(s.data)
    })
    .await;
    for forged in [
        &b"job_success"[..],
        b"session_end",
        b"machine_unfit_for_service",
    ] {
        assert!(
            !log.windows(forged.len()).any(|w| w == forged),
            "forged line {:?} reached the victim's log",
            String::from_utf8_lossy(forged)
        );
        assert!(!at_victim.windows(forged.len()).any(|w| w == forged));
    }
    // The refusals and the log need a token or the lease.
    let err = anon.refusals(victim, 0).await.unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");
    let err = anon
        .log(victim, &dutgate_salad::client::Since::Offset(0), None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");
}

/// A job secret printed by the DUT in pieces (split over serial reads) never reaches a
/// client, the scrollback or the log; once cleared, the same bytes pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_split_across_reads_is_masked_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let salad = Salad::start(&dir.path().join("state"), config(dir.path())).await;
    let victim = machine(0x2201);
    let lease = salad.mars.running(victim, VICTIM_IP).await;
    let job = salad.client_with(None).with_lease(&lease);
    const SECRET: &str = "AKIAIOSFODNN7EXAMPLE";
    const OTHER: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
    job.set_secrets(victim, &[SECRET.into(), OTHER.into()])
        .await
        .unwrap();
    assert!(
        salad
            .client_with(Some(USER))
            .set_secrets(victim, &[SECRET.into()])
            .await
            .unwrap_err()
            .to_string()
            .contains("403")
    );
    let short = job.set_secrets(victim, &["abc".into()]).await.unwrap_err();
    assert!(short.to_string().contains("400"), "{short}");
    job.expect(victim).await.unwrap();

    let pair = PtyPair::in_dir(dir.path(), "secret").await;
    salad.wait_port(&pair.adapter, None).await;
    let mut dut = pair.open_dut();
    dut.write_all(format!("SALAD.machine_id={victim}\n").as_bytes())
        .await
        .unwrap();
    salad.wait_port(&pair.adapter, Some(victim)).await;
    let console = salad.client.machine(victim).await.unwrap();
    let mut client = salad.connect(console.tcp_port).await;
    say_until_heard(&mut dut, b"ready\n", &mut client, "console").await;

    // The secret in three writes, each read separately by salad (the pauses are shorter than
    // the hold time), with the other secret whole right after it.
    let (a, rest) = SECRET.split_at(5);
    let (b, c) = rest.split_at(9);
    for piece in [format!("dutgate.s3=http://gw,bucket,{a}"), b.to_string()] {
        dut.write_all(piece.as_bytes()).await.unwrap();
        dut.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    dut.write_all(format!("{c},{OTHER} end\n").as_bytes())
        .await
        .unwrap();
    let got = read_until(&mut client, b" end\n", "masked line").await;
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.contains("dutgate.s3=http://gw,bucket,[MASKED],[MASKED] end\n"),
        "{text}"
    );
    let mut logs = salad.connect(console.tcp_port_logs).await;
    let replay = read_until(&mut logs, b" end\n", "scrollback").await;
    let log = wait_for("log has the line", || async {
        let s = job
            .log(victim, &dutgate_salad::client::Since::Offset(0), None)
            .await
            .ok()?;
        String::from_utf8_lossy(&s.data)
            .contains(" end\n")
            .then_some(s.data)
    })
    .await;
    for (what, bytes) in [("client", &got), ("scrollback", &replay), ("log", &log)] {
        for secret in [SECRET, OTHER, &SECRET[..12], &SECRET[5..]] {
            let text = String::from_utf8_lossy(bytes);
            assert!(!text.contains(secret), "{what} holds {secret:?}: {text}");
        }
    }
    // A prompt that looks like a secret's start arrives after the hold time, as it is.
    dut.write_all(b"prompt AKIA").await.unwrap();
    read_until(&mut client, b"prompt AKIA", "held bytes flushed on idle").await;

    // Cleared: the same bytes pass (the masking above was the secrets', nothing else).
    job.clear_secrets(victim).await.unwrap();
    dut.write_all(format!("\nagain {SECRET}\n").as_bytes())
        .await
        .unwrap();
    read_until(&mut client, SECRET.as_bytes(), "unmasked after clear").await;
}

/// Raw console ports: refused from a DUT network (even one listed as a console client
/// network) and from outside the console client networks, closed at once and counted;
/// accepted from the gateway itself and from a console client network.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_ports_refuse_dut_and_foreign_networks() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dutgate_salad::Config {
        // 127.0.0.2 (a DUT address) is inside; 127.0.0.5 is outside.
        console_client_networks: nets(&["127.0.0.0/30", "::1/128"]),
        ..config(dir.path())
    };
    let salad = salad_with_dut_networks(dir.path(), cfg).await;
    let victim = machine(0x2301);
    let pair = PtyPair::in_dir(dir.path(), "ports").await;
    salad.wait_port(&pair.adapter, None).await;
    let mut dut = pair.open_dut();
    dut.write_all(format!("SALAD.machine_id={victim}\n").as_bytes())
        .await
        .unwrap();
    salad.wait_port(&pair.adapter, Some(victim)).await;
    let console = salad.client.machine(victim).await.unwrap();

    let mut from_gateway = salad.connect(console.tcp_port).await;
    let mut allowed = connect_from("127.0.0.1", local(console.tcp_port_logs))
        .await
        .unwrap();
    for port in [console.tcp_port, console.tcp_port_logs] {
        for from in [VICTIM_IP, "127.0.0.5"] {
            let mut s = connect_from(from, local(port)).await.unwrap();
            // What a refused client types must not reach the DUT either.
            let _ = s.write_all(b"intruder-input\n").await;
            assert!(
                closed_without_data(&mut s).await,
                "{from} was let in on port {port}"
            );
        }
    }
    say_until_heard(
        &mut dut,
        b"hello gateway\n",
        &mut from_gateway,
        "gateway client",
    )
    .await;
    read_until(&mut allowed, b"hello gateway\n", "log port client").await;
    from_gateway.write_all(b"from-gateway\n").await.unwrap();
    let got = read_until(&mut dut, b"from-gateway\n", "DUT input").await;
    assert!(
        !got.windows(14).any(|w| w == b"intruder-input"),
        "a refused client's input reached the DUT"
    );
    let metrics = reqwest::get(format!("http://{}/metrics", salad.handle().http_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let refused = metrics
        .lines()
        .find(|l| l.starts_with("dutgate_salad_console_clients_refused_total"))
        .unwrap_or_else(|| panic!("no refusal counter in:\n{metrics}"));
    assert!(refused.ends_with(" 4"), "{refused}");
}

/// The netconsole ingest answers the DUT networks only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netconsole_ingest_refuses_other_networks() {
    let dir = tempfile::tempdir().unwrap();
    let salad = salad_with_dut_networks(dir.path(), config(dir.path())).await;
    let ingest = salad.handle().netconsole_addr.unwrap();
    let mut outsider = connect_from("127.0.0.1", ingest).await.unwrap();
    let _ = outsider.write_all(b"SALAD.ping\n").await;
    assert!(closed_without_data(&mut outsider).await);
    let mut dut = connect_from(VICTIM_IP, ingest).await.unwrap();
    dut.write_all(b"SALAD.ping\n").await.unwrap();
    read_until(&mut dut, b"SALAD.pong\n", "DUT network netconsole").await;
}

/// Creating a console server (two ports) needs a token and is bounded; a DUT printing
/// made-up ids gets at most `max_unregistered_consoles` of them, and a bound stream printing
/// made-up ids allocates nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocation_needs_a_token_and_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dutgate_salad::Config {
        max_consoles: 4,
        max_unregistered_consoles: 2,
        ..config(dir.path())
    };
    let salad = salad_with_dut_networks(dir.path(), cfg).await;
    let anon = salad.client_with(None);
    let err = anon.machine(machine(0x2401)).await.unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");
    assert!(salad.client.machines().await.unwrap().machines.is_empty());
    let user = salad.client_with(Some(USER));
    let created = user.machine(machine(0x2401)).await.unwrap();
    // Known now: its ports are no secret.
    assert_eq!(anon.machine(machine(0x2401)).await.unwrap(), created);

    // Made-up ids, one per connection, from a DUT.
    let ingest = salad.handle().netconsole_addr.unwrap();
    let mut streams = Vec::new();
    for n in 0..3u32 {
        let mut s = connect_from(ATTACKER_IP, ingest).await.unwrap();
        let id = machine(0x2500 + n);
        s.write_all(format!("SALAD.machine_id={id}\n").as_bytes())
            .await
            .unwrap();
        if n < 2 {
            wait_netconsole_bound(&salad, s.local_addr().unwrap(), id).await;
        } else {
            let name = format!("netconsole {}", s.local_addr().unwrap());
            wait_for("third made-up id refused", || async {
                let ports = salad.client.ports().await.ok()?;
                ports
                    .ports
                    .iter()
                    .any(|p| p.name == name && p.machine.is_none() && p.refused == 1)
                    .then_some(())
            })
            .await;
            assert!(
                !salad
                    .client
                    .machines()
                    .await
                    .unwrap()
                    .machines
                    .contains_key(&id)
            );
        }
        streams.push(s);
    }
    // A bound stream printing a thousand made-up ids: nothing is created, nothing recorded.
    for n in 0..1000u32 {
        streams[0]
            .write_all(format!("SALAD.machine_id={}\n", machine(0x3000 + n)).as_bytes())
            .await
            .unwrap();
    }
    streams[0].write_all(b"done\n").await.unwrap();
    let first = machine(0x2500);
    let console = salad.client.machine(first).await.unwrap();
    let mut client = salad.connect(console.tcp_port).await;
    say_until_heard(
        &mut streams[0],
        b"still bound\n",
        &mut client,
        "bound stream",
    )
    .await;
    let list = salad.client.machines().await.unwrap();
    assert_eq!(list.machines.len(), 3, "{:?}", list.machines.keys());
    assert!(
        salad
            .client
            .refusals(first, 0)
            .await
            .unwrap()
            .refusals
            .len()
            <= 100
    );

    // The admin fills the last place; beyond max_consoles is a clear 409.
    salad.client.machine(machine(0x2402)).await.unwrap();
    let err = user.machine(machine(0x2403)).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("409") && text.contains("max_consoles"),
        "{text}"
    );
}

/// The per-machine console WebSocket: the lease holder (or an admin) reads and types; no
/// token, a user token or another lease is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_websocket_is_for_the_lease_holder() {
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let dir = tempfile::tempdir().unwrap();
    let salad = Salad::start(&dir.path().join("state"), config(dir.path())).await;
    let victim = machine(0x2601);
    let lease = salad.mars.running(victim, VICTIM_IP).await;
    let job = salad.client_with(None).with_lease(&lease);
    job.expect(victim).await.unwrap();
    let pair = PtyPair::in_dir(dir.path(), "ws").await;
    salad.wait_port(&pair.adapter, None).await;
    let mut dut = pair.open_dut();
    dut.write_all(format!("SALAD.machine_id={victim}\n").as_bytes())
        .await
        .unwrap();
    salad.wait_port(&pair.adapter, Some(victim)).await;

    let url = job.console_url(victim);
    let request = |header: Option<(&'static str, String)>| {
        let mut req = url.as_str().into_client_request().unwrap();
        if let Some((k, v)) = header {
            req.headers_mut().insert(k, v.parse().unwrap());
        }
        req
    };
    for (header, status) in [
        (None, 401),
        (Some(("authorization", format!("Bearer {USER}"))), 403),
        (
            Some(("x-lease-id", "0123456789abcdef0123456789abcdef".to_string())),
            403,
        ),
    ] {
        match tokio_tungstenite::connect_async(request(header)).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status().as_u16(), status)
            }
            other => panic!("expected {status}, got {:?}", other.map(|_| ())),
        }
    }
    let (mut ws, _) = tokio_tungstenite::connect_async(request(Some(("x-lease-id", lease))))
        .await
        .unwrap();
    let heard = async {
        let mut got = Vec::new();
        while let Some(Ok(msg)) = ws.next().await {
            if let Message::Binary(b) = msg {
                got.extend_from_slice(&b);
                if got.windows(9).any(|w| w == b"ws-hello\n") {
                    return ws;
                }
            }
        }
        panic!("WebSocket ended before the DUT output");
    };
    let talk = async {
        loop {
            dut.write_all(b"ws-hello\n").await.unwrap();
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    };
    let mut ws = tokio::select! {
        ws = heard => ws,
        _ = talk => unreachable!(),
    };
    ws.send(Message::Binary(b"ws-typed\n".to_vec().into()))
        .await
        .unwrap();
    read_until(&mut dut, b"ws-typed\n", "DUT input from the WebSocket").await;
}
