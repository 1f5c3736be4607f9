//! The boot config table on every backend (SQLite, and PostgreSQL when configured).

use dutgate_boot::store::{Deleted, MIGRATIONS, Store};
use dutgate_boot::{BootConfig, Kernel};
use dutgate_core::MachineId;
use dutgate_core::db::testing::databases;

fn config(job: Option<&str>, cmdline: &str) -> BootConfig {
    BootConfig {
        kernel: Kernel {
            url: "http://x/vmlinuz".into(),
            cmdline: cmdline.into(),
            sha256: None,
        },
        initramfs: vec![],
        job_id: job.map(str::to_string),
    }
}

#[tokio::test]
async fn boot_configs_on_every_backend() {
    let a = MachineId::parse("52:54:00:00:00:0a").unwrap();
    let b = MachineId::parse("52:54:00:00:00:0b").unwrap();
    for db in databases("boot", MIGRATIONS).await {
        let store = Store::new(db.db.clone());
        assert_eq!(store.get(a).await.unwrap(), None);
        store.put(a, &config(Some("1"), "x;y é"), 10).await.unwrap();
        // Replacing keeps one row per machine.
        let stored = store.put(a, &config(Some("2"), "z"), 20).await.unwrap();
        assert_eq!(stored.updated_at, 20);
        store.put(b, &config(None, ""), 30).await.unwrap();
        let got = store.get(a).await.unwrap().unwrap();
        assert_eq!(got.config, config(Some("2"), "z"));
        assert_eq!(got.updated_at, 20);
        let all = store.list().await.unwrap();
        assert_eq!(
            all.iter().map(|s| s.mac).collect::<Vec<_>>(),
            vec![a, b],
            "{:?}",
            db.backend()
        );
        assert_eq!(
            store.delete(a, Some("1")).await.unwrap(),
            Deleted::OtherJob(Some("2".into()))
        );
        assert_eq!(store.delete(a, Some("2")).await.unwrap(), Deleted::Yes);
        assert_eq!(store.delete(a, None).await.unwrap(), Deleted::Absent);
        assert_eq!(store.delete(b, None).await.unwrap(), Deleted::Yes);
        assert!(store.list().await.unwrap().is_empty());
        db.cleanup().await;
    }
}
