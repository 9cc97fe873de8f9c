//! Loopback integration tests: a real server and real clients over QUIC on 127.0.0.1, in one
//! process (tasks). The cross-process suite is in crates/cli/tests/e2e_service.rs.

use fedlora_service::demo::{run_demo, DemoOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_clients_two_rounds_aggregate_exactly() {
    // 100,000 parameters: each masked input is a 300 KB frame, streamed into the sum in two
    // pieces (protocol-spec §4.3.2 streaming).
    let report = run_demo(DemoOptions {
        clients: 4,
        parameters: 100_000,
        rounds: 2,
        stage_timeout_ms: 20_000,
        upload_slots: 2,
        ..DemoOptions::default()
    })
    .await
    .expect("demo runs");
    assert_eq!(report.rounds.len(), 2);
    for r in &report.rounds {
        assert_eq!(r.status, "finished", "{r:?}");
        assert_eq!(r.survivors, 4);
        assert!(r.exact, "{r:?}");
    }
    // Rounds are numbered consecutively and recorded in the store.
    assert_eq!(
        report.server.rounds[0].round + 1,
        report.server.rounds[1].round
    );
    let ingest = report.server.rounds[0]
        .ingest
        .clone()
        .expect("ingest measured");
    assert_eq!(ingest.frames, 4);
    assert!(ingest.wire_bytes > ingest.quantized_bytes);
    std::fs::remove_dir_all(&report.dir).expect("cleanup");
}

/// Distributed DP across the service: clients clip and add their noise share inside the masks,
/// the server plans the round against its budget and records the realised epsilon in the audit
/// log; the aggregate is noisy, so it is not the plain mean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_dp_round_records_realised_epsilon() {
    let privacy: fedlora_dp::PrivacyConfig = toml::from_str(
        "mode = \"distributed\"\nnoise_multiplier = 1.0\nclip_norm = 1.0\nbudget_epsilon = 100.0\n",
    )
    .expect("privacy config");
    let dir = std::env::temp_dir().join(format!("fedlora-dp-loopback-{}", std::process::id()));
    let report = run_demo(DemoOptions {
        clients: 4,
        parameters: 2_000,
        rounds: 1,
        dir: Some(dir.clone()),
        stage_timeout_ms: 20_000,
        upload_slots: 2,
        privacy: Some(privacy),
        ..DemoOptions::default()
    })
    .await
    .expect("demo runs");
    let round = &report.rounds[0];
    assert_eq!(round.status, "finished", "{round:?}");
    assert!(!round.exact, "noise must move the aggregate: {round:?}");
    let (store, _) = fedlora_service::store::Store::open(
        &dir.join("server"),
        std::sync::Arc::new(fedlora_service::clock::SystemClock),
    )
    .expect("store");
    let events = store.audit_events().expect("audit log");
    let realised = events
        .iter()
        .find(|(_, e, _)| e == "privacy_realised")
        .expect("realised epsilon in the audit log");
    let detail: serde_json::Value = serde_json::from_str(&realised.2).expect("json detail");
    assert_eq!(detail["survivors"], 4);
    let eps = detail["round_epsilon"].as_f64().expect("epsilon");
    assert!(eps.is_finite() && eps > 0.0, "{detail}");
    assert!(events.iter().any(|(_, e, _)| e == "privacy_planned"));
    std::fs::remove_dir_all(&dir).expect("cleanup");
}
