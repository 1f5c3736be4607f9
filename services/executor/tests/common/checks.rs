//! What must hold once a fault has passed, whatever it was: every job ended exactly once and
//! ran at most once, no lease outlives its job, and no machine is powered (as its PDU reads)
//! or keeps a boot config while no job holds it.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use dutgate_boot::client::BootClient;
use dutgate_core::{MachineId, PowerState, Secret};
use dutgate_executor::model::{JobState, kind};
use dutgate_mars::client::MarsClient;

use super::{ADMIN, Farm, kinds};

/// Checks that the jobs `ids` are finished, each exactly once and run at most once, then
/// waits (bounded by `within`: leases expire, sweepers run) until nothing is left of them:
/// no lease of theirs on `mars`, and every machine of the farm that no lease holds reads OFF
/// on the PDU and has no boot config. Panics with what is left.
pub async fn assert_nothing_left(farm: &Farm, mars: &MarsClient, ids: &[i64], within: Duration) {
    for &id in ids {
        let job = farm.job(id).await;
        let events = farm.events(id).await;
        assert!(
            job.state == JobState::Finished && job.status.is_some(),
            "job {id} did not end: {job:#?}\n{:#?}",
            kinds(&events)
        );
        let count = |k: &str| events.iter().filter(|e| e.kind == k).count();
        assert_eq!(count(kind::FINISHED), 1, "job {id}: {:#?}", kinds(&events));
        assert!(
            count(kind::DISPATCHED) <= 1 && count(kind::PROCESS_STARTED) <= 1,
            "job {id} ran twice: {:#?}",
            kinds(&events)
        );
    }
    let boot = BootClient::new(
        format!("http://127.0.0.1:{}", farm.gw.ports.boot),
        Some(Secret::new(ADMIN)),
    );
    let end = Instant::now() + within;
    loop {
        let left = leftovers(farm, mars, &boot, ids).await;
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < end, "left after {within:?}: {left:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What is left of the jobs `ids` right now, one line each.
async fn leftovers(farm: &Farm, mars: &MarsClient, boot: &BootClient, ids: &[i64]) -> Vec<String> {
    let mut left = Vec::new();
    let leases = mars.leases().await.expect("mars' leases");
    for l in &leases {
        if l.job_id.parse().is_ok_and(|j: i64| ids.contains(&j)) {
            left.push(format!(
                "lease {} of finished job {} on machine {}",
                l.id, l.job_id, l.machine_id
            ));
        }
    }
    let held: HashSet<MachineId> = leases.iter().map(|l| l.machine_id).collect();
    let configs = boot.list().await.expect("boot's configs");
    for (n, m) in (1u16..).zip(&farm.machines) {
        if held.contains(m) {
            continue;
        }
        let power = farm.power(n);
        if power != PowerState::Off {
            left.push(format!(
                "machine {m} reads {power} on its PDU, and no job holds it"
            ));
        }
        if let Some(c) = configs.iter().find(|c| c.mac == *m) {
            left.push(format!(
                "machine {m} keeps the boot config of job {:?}, and no job holds it",
                c.config.job_id
            ));
        }
    }
    left
}
