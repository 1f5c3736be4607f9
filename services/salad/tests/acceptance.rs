//! Acceptance tests of issue 4, against real ptys (socat pairs play the USB serial adapters),
//! real TCP clients (and netcat), with salad running in-process on ephemeral ports.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

/// 1. ping/pong with leading garbage and `\r\n`, association, REST, and both directions
///    through `nc` and a Rust client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_association_and_netcat() {
    let dir = tempfile::tempdir().unwrap();
    let salad = Salad::start(
        &dir.path().join("state"),
        test_config(
            &format!("{}/*-adapter", dir.path().display()),
            port_range(20),
        ),
    )
    .await;
    let pair = PtyPair::in_dir(dir.path(), "dut1").await;
    salad.wait_port(&pair.adapter, None).await;
    let mut dut = pair.open_dut();

    dut.write_all(b"\x00\xfcSALAD.ping\r\n").await.unwrap();
    let got = read_until(&mut dut, b"SALAD.pong\n", "DUT waiting for pong").await;
    assert!(got.ends_with(b"SALAD.pong\n"), "{got:?}");

    let id: dutgate_core::MachineId = "52:54:00:12:34:56".parse().unwrap();
    dut.write_all(b"SALAD.machine_id=52:54:00:12:34:56\r\n")
        .await
        .unwrap();
    let console = salad.wait_machine(id).await;
    assert!(salad.config.console_ports.contains(console.tcp_port));
    assert!(salad.config.console_ports.contains(console.tcp_port_logs));
    assert_ne!(console.tcp_port, console.tcp_port_logs);
    assert!(!console.has_client);
    // The same object from the per-machine route.
    assert_eq!(salad.client.machine(id).await.unwrap(), console);
    salad.wait_port(&pair.adapter, Some(id)).await;

    // netcat, as a human would.
    let mut nc = netcat(console.tcp_port);
    let mut nc_out = nc.stdout.take().unwrap();
    let mut nc_in = nc.stdin.take().unwrap();
    wait_for("has_client after nc connects", || async {
        salad
            .client
            .machine(id)
            .await
            .ok()
            .filter(|c| c.has_client)
            .map(|_| ())
    })
    .await;
    dut.write_all(b"login: hello from the DUT\r\n")
        .await
        .unwrap();
    read_until(
        &mut nc_out,
        b"hello from the DUT\r\n",
        "nc reading the console",
    )
    .await;
    nc_in.write_all(b"root\n").await.unwrap();
    nc_in.flush().await.unwrap();
    read_until(&mut dut, b"root\n", "DUT reading what nc sent").await;

    // A Rust client alongside: both get the output, both can type.
    let mut tcp = salad.client.connect(id, "127.0.0.1").await.unwrap();
    dut.write_all(b"SYNC-A\n").await.unwrap();
    read_until(&mut nc_out, b"SYNC-A\n", "nc").await;
    // The Rust client may have registered after SYNC-A: repeat until it sees a marker.
    say_until_heard(&mut dut, b"MARK\n", &mut tcp, "tcp client").await;
    tcp.write_all(b"from-tcp\n").await.unwrap();
    read_until(&mut dut, b"from-tcp\n", "DUT reading the TCP client").await;

    // The console log has every line, stamped.
    let log = wait_for("log contains the DUT output", || async {
        let s = salad
            .client
            .log(id, &dutgate_salad::client::Since::Offset(0), None)
            .await
            .ok()?;
        String::from_utf8_lossy(&s.data)
            .contains("hello from the DUT")
            .then_some(s)
    })
    .await;
    let text = String::from_utf8_lossy(&log.data).into_owned();
    let line = text
        .lines()
        .find(|l| l.contains("login: hello from the DUT"))
        .unwrap();
    assert_eq!(&line[4..5], "-", "stamped line: {line}");
    assert!(line[..28].ends_with("Z "), "stamped line: {line}");
    // Polling from the end returns nothing new; an unknown machine is a 404, a bad id a 400.
    let next = salad
        .client
        .log(id, &dutgate_salad::client::Since::Offset(log.end), None)
        .await
        .unwrap();
    assert_eq!(next.start, log.end);
    let missing = "52:54:00:ff:ff:ff".parse().unwrap();
    let err = salad
        .client
        .log(missing, &dutgate_salad::client::Since::Offset(0), None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("404"), "{err}");
    let bad = reqwest::get(format!(
        "http://{}/api/v1/machine/nope",
        salad.handle().http_addr
    ))
    .await
    .unwrap();
    assert_eq!(bad.status(), 400);

    // The log port replays what was said before connecting; the main port does not.
    let mut logs = salad.connect(console.tcp_port_logs).await;
    read_until(&mut logs, b"hello from the DUT", "log port replay").await;
    drop(nc_in);
    let _ = nc.kill().await;
}

/// 2. Three clients get identical bytes; one stops reading and is dropped within a bounded
///    time while the other two receive everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_client_is_dropped_others_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = dutgate_salad::Config {
        client_queue_bytes: 64 * 1024,
        scrollback_kib: 16,
        ..test_config(
            &format!("{}/*-adapter", dir.path().display()),
            port_range(20),
        )
    };
    let salad = Salad::start(&dir.path().join("state"), config).await;
    let pair = PtyPair::in_dir(dir.path(), "dut2").await;
    salad.wait_port(&pair.adapter, None).await;
    let mut dut = pair.open_dut();
    let id = machine(2);
    dut.write_all(format!("SALAD.machine_id={id}\n").as_bytes())
        .await
        .unwrap();
    let console = salad.wait_machine(id).await;
    salad.wait_port(&pair.adapter, Some(id)).await;

    const LEN: usize = 12 * 1024 * 1024;
    let data = payload(2, LEN);
    let mut synced = Vec::new();
    let mut readers = Vec::new();
    for _ in 0..2 {
        let (tx, rx) = tokio::sync::oneshot::channel();
        synced.push(rx);
        let sock = salad.connect(console.tcp_port).await;
        readers.push(tokio::spawn(checked_reader(sock, LEN, tx)));
    }
    // The stalled client: a tiny receive window, reads the sync marker, then nothing.
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut stalled = sock.connect(local(console.tcp_port)).await.unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    synced.push(rx);
    let stalled_task = tokio::spawn(async move {
        read_until(&mut stalled, SYNC, "stalled client sync").await;
        let _ = tx.send(());
        stalled
    });

    checked_writer(&mut dut, synced, &data).await;
    let want = sha256(&data);
    for r in readers {
        assert_eq!(
            r.await.unwrap(),
            want,
            "a reading client lost or reordered bytes"
        );
    }
    // The stalled client must have been disconnected: reading it now drains what was in
    // flight, then ends, within a bounded time, and holds far less than the whole payload.
    let mut stalled = stalled_task.await.unwrap();
    let mut drained = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match stalled.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the stalled client was never disconnected");
    assert!(
        drained < LEN,
        "the stalled client got everything ({drained} bytes)"
    );
    // Exactly one client was dropped: the stalled one, never the two that kept reading.
    let metrics = reqwest::get(format!("http://{}/metrics", salad.handle().http_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let drops = metrics
        .lines()
        .find(|l| {
            l.starts_with("dutgate_salad_machine_client_drops_total") && l.contains(&id.to_string())
        })
        .unwrap_or_else(|| panic!("no drop counter for {id} in:\n{metrics}"));
    assert!(drops.ends_with(" 1"), "{drops}");
}

/// 3. Unplug and replug the adapter during output: salad reopens it, the console continues on
///    the same TCP port (same client connection), and a new `SALAD.machine_id=` re-binds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unplug_and_replug_keeps_the_console() {
    let dir = tempfile::tempdir().unwrap();
    let salad = Salad::start(
        &dir.path().join("state"),
        test_config(
            &format!("{}/*-adapter", dir.path().display()),
            port_range(20),
        ),
    )
    .await;
    let mut pair = PtyPair::in_dir(dir.path(), "dut3").await;
    salad.wait_port(&pair.adapter, None).await;
    let mut dut = pair.open_dut();
    let id = machine(3);
    dut.write_all(format!("SALAD.machine_id={id}\n").as_bytes())
        .await
        .unwrap();
    let console = salad.wait_machine(id).await;
    salad.wait_port(&pair.adapter, Some(id)).await;
    let mut client = salad.connect(console.tcp_port).await;

    // Output flows continuously while the adapter is pulled out.
    let ticker = tokio::spawn(async move {
        let mut i = 0u64;
        loop {
            if dut
                .write_all(format!("before {i}\n").as_bytes())
                .await
                .is_err()
            {
                return i;
            }
            i += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    read_until(&mut client, b"before 1", "client before unplug").await;
    pair.unplug().await;
    salad.wait_port_closed(&pair.adapter).await;
    ticker.abort();

    // Replug: a new pty pair at the same paths.
    let pair = PtyPair::in_dir(dir.path(), "dut3").await;
    salad.wait_port(&pair.adapter, Some(id)).await;
    let mut dut = pair.open_dut();
    say_until_heard(
        &mut dut,
        b"after replug\n",
        &mut client,
        "same client after replug",
    )
    .await;
    let again = salad.client.machine(id).await.unwrap();
    assert_eq!(again.tcp_port, console.tcp_port);
    assert_eq!(again.tcp_port_logs, console.tcp_port_logs);
    let metrics = reqwest::get(format!("http://{}/metrics", salad.handle().http_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let key = pair.adapter.display().to_string();
    let reopens = metrics
        .lines()
        .find(|l| l.starts_with("dutgate_salad_port_reopens_total") && l.contains(&key))
        .unwrap_or_else(|| panic!("no reopen counter for {key} in:\n{metrics}"));
    assert!(reopens.ends_with(" 1"), "{reopens}");

    // The replugged adapter now leads to another machine. What the DUT prints cannot move a
    // bound stream (refused, recorded on both machines); an admin re-binds it.
    let other = machine(33);
    dut.write_all(format!("SALAD.machine_id={other}\n").as_bytes())
        .await
        .unwrap();
    let refused = wait_for("the refusal recorded on the bound machine", || async {
        let l = salad.client.refusals(id, 0).await.ok()?;
        l.refusals.into_iter().find(|r| r.claimed == other)
    })
    .await;
    assert_eq!(refused.bound_to, Some(id));
    assert!(refused.reason.contains("only an admin"), "{refused:?}");
    say_until_heard(
        &mut dut,
        b"still the first machine\n",
        &mut client,
        "stream stays bound",
    )
    .await;
    let stream = salad
        .client
        .ports()
        .await
        .unwrap()
        .ports
        .into_iter()
        .find(|p| p.name == pair.adapter.display().to_string())
        .unwrap()
        .id;
    let err = salad
        .client_with(Some(USER))
        .bind_stream(stream, Some(other))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("403"), "{err}");
    salad.client.bind_stream(stream, Some(other)).await.unwrap();
    let other_console = salad.wait_machine(other).await;
    salad.wait_port(&pair.adapter, Some(other)).await;
    assert_ne!(other_console.tcp_port, console.tcp_port);
    let mut other_client = salad.connect(other_console.tcp_port).await;
    say_until_heard(
        &mut dut,
        b"for the other machine\n",
        &mut other_client,
        "re-bound console",
    )
    .await;
    other_client.write_all(b"typed\n").await.unwrap();
    read_until(&mut dut, b"typed\n", "DUT input after re-binding").await;
}

/// 4. A restarted salad gives every machine the same ports, and a remembered adapter is bound
///    again without a new announcement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_ports() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = test_config(
        &format!("{}/*-adapter", dir.path().display()),
        port_range(20),
    );
    let mut salad = Salad::start(&state, config.clone()).await;
    // One machine created through REST before its DUT ever talked, one by association.
    let rest_only = machine(40);
    let by_rest = salad.client.machine(rest_only).await.unwrap();
    let pair = PtyPair::in_dir(dir.path(), "dut4").await;
    salad.wait_port(&pair.adapter, None).await;
    let mut dut = pair.open_dut();
    let id = machine(4);
    dut.write_all(format!("SALAD.machine_id={id}\n").as_bytes())
        .await
        .unwrap();
    let by_serial = salad.wait_machine(id).await;
    salad.wait_port(&pair.adapter, Some(id)).await;
    let before = salad.client.machines().await.unwrap();
    assert_eq!(before.machines.len(), 2);
    assert_ne!(by_rest.tcp_port, by_serial.tcp_port);

    salad.stop().await;
    drop(dut);
    let salad = Salad::start(&state, config).await;
    let after = salad.client.machines().await.unwrap();
    assert_eq!(after, before, "same machines, same ports after a restart");
    salad.wait_port(&pair.adapter, Some(id)).await;
    let mut client = salad.connect(by_serial.tcp_port).await;
    let mut dut = pair.open_dut();
    say_until_heard(
        &mut dut,
        b"after restart\n",
        &mut client,
        "console after restart",
    )
    .await;
    // The REST-only machine's ports answer too.
    salad.connect(by_rest.tcp_port).await;
    salad.connect(by_rest.tcp_port_logs).await;
    // Deleting frees the ports (admin only).
    salad.client.delete_machine(rest_only).await.unwrap();
    let left = salad.client.machines().await.unwrap();
    assert!(!left.machines.contains_key(&rest_only));
    let anonymous = dutgate_salad::client::SaladClient::new(
        format!("http://{}", salad.handle().http_addr),
        None,
    );
    let err = anonymous.delete_machine(id).await.unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");
}

/// 5. 64 adapters streaming at once: every byte arrives, in order, on every console.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_ports_lose_nothing() {
    const PORTS: u32 = 64;
    const LEN: usize = 256 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let salad = Salad::start(
        &dir.path().join("state"),
        test_config(
            &format!("{}/*-adapter", dir.path().display()),
            port_range(160),
        ),
    )
    .await;
    let mut pairs = Vec::new();
    for i in 0..PORTS {
        pairs.push(PtyPair::in_dir(dir.path(), &format!("dut5-{i:02}")).await);
    }
    let mut duts = Vec::new();
    for (i, pair) in pairs.iter().enumerate() {
        salad.wait_port(&pair.adapter, None).await;
        let mut dut = pair.open_dut();
        let id = machine(500 + i as u32);
        dut.write_all(format!("SALAD.machine_id={id}\n").as_bytes())
            .await
            .unwrap();
        duts.push((id, dut));
    }
    let mut transfers = Vec::new();
    for (i, (id, mut dut)) in duts.into_iter().enumerate() {
        let console = salad.wait_machine(id).await;
        let sock = salad.connect(console.tcp_port).await;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let reader = tokio::spawn(checked_reader(sock, LEN, tx));
        let data = payload(500 + i as u64, LEN);
        let want = sha256(&data);
        let writer = tokio::spawn(async move {
            checked_writer(&mut dut, vec![rx], &data).await;
            dut
        });
        transfers.push((id, want, reader, writer));
    }
    for (id, want, reader, writer) in transfers {
        let got = reader.await.unwrap();
        assert_eq!(got, want, "console of {id} lost or reordered bytes");
        drop(writer.await.unwrap());
    }
    let list = salad.client.machines().await.unwrap();
    assert_eq!(list.machines.len(), PORTS as usize);
}

/// A netconsole (QEMU `-chardev socket` style) is a console like a serial port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netconsole_is_a_console() {
    let dir = tempfile::tempdir().unwrap();
    let salad = Salad::start(
        &dir.path().join("state"),
        test_config(&format!("{}/none-*", dir.path().display()), port_range(20)),
    )
    .await;
    let addr = salad.handle().netconsole_addr.unwrap();
    let mut dut = tokio::net::TcpStream::connect(addr).await.unwrap();
    dut.write_all(b"garbage SALAD.ping\n").await.unwrap();
    read_until(&mut dut, b"SALAD.pong\n", "netconsole pong").await;
    let id = machine(6);
    dut.write_all(
        format!("Command line: console=ttyS0 SALAD.machine_id={id} quiet\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let console = salad.wait_machine(id).await;
    let mut client = salad.connect(console.tcp_port).await;
    say_until_heard(
        &mut dut,
        b"netconsole says hi\n",
        &mut client,
        "client of a netconsole",
    )
    .await;
    client.write_all(b"input\n").await.unwrap();
    read_until(&mut dut, b"input\n", "netconsole input").await;
}

/// Ports held by another program are skipped; a full range is a 503, not a panic or a reuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocation_skips_busy_ports_and_reports_exhaustion() {
    let dir = tempfile::tempdir().unwrap();
    let range = port_range(3);
    // Someone else holds the first port of the range.
    let squatter = std::net::TcpListener::bind(("127.0.0.1", range.first)).unwrap();
    let salad = Salad::start(
        &dir.path().join("state"),
        test_config(&format!("{}/none-*", dir.path().display()), range),
    )
    .await;
    let first = salad.client.machine(machine(70)).await.unwrap();
    assert_eq!(
        (first.tcp_port, first.tcp_port_logs),
        (range.first + 1, range.first + 2)
    );
    let err = salad.client.machine(machine(71)).await.unwrap_err();
    assert!(err.to_string().contains("503"), "{err}");
    assert!(err.to_string().contains("console_ports"), "{err}");
    drop(squatter);
    // Once the port is free again, a new machine can have it.
    let _ = salad.client.delete_machine(machine(70)).await;
    let second = salad.client.machine(machine(71)).await.unwrap();
    assert!(range.contains(second.tcp_port) && range.contains(second.tcp_port_logs));
}
