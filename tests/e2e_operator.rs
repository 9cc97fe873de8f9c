//! End-to-end tests of the operator-facing behaviour of the real `fedlora` binary, in separate
//! processes on 127.0.0.1, one case per class of defect of issue 12: silent wrong data, checks made
//! too late, exit codes, signals, messages, ranges, quiet output, hostnames. Each case asserts the
//! exact exit code, that the message names the file or the key (and the cause once), and, for a
//! refused start, that nothing was written.

#[path = "support/proc.rs"]
mod proc;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedlora_service::clock::SystemClock;
use fedlora_service::config::ServerConfig;
use fedlora_service::store::{RoundStatus, Store};
use proc::Proc;
use serde_json::Value;

/// A scratch directory with client identities (`fedlora keygen`), removed afterwards.
struct Site {
    dir: PathBuf,
    names: Vec<String>,
    publics: Vec<String>,
}

impl Site {
    fn new(tag: &str, clients: usize) -> Site {
        let dir = std::env::temp_dir().join(format!("fedlora-e2e-op-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let mut site = Site {
            dir,
            names: Vec::new(),
            publics: Vec::new(),
        };
        for i in 0..clients {
            let name = format!("hospital-{}", (b'a' + i as u8) as char);
            let (code, v, log) = run(&[
                "--json",
                "keygen",
                "--out",
                site.path(&name).to_str().expect("utf8"),
            ]);
            assert_eq!(code, 0, "{log}");
            site.publics
                .push(v["public_key"].as_str().expect("public_key").to_string());
            site.names.push(name);
        }
        site
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    fn write(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.path(rel);
        std::fs::write(&p, text).expect("write");
        p
    }

    /// A server config: `extra` is TOML placed before the enrolled clients.
    fn server_config(&self, rounds: u64, min: usize, extra: &str) -> PathBuf {
        let mut s = format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\n[rounds]\ncount = {rounds}\nmin_clients = {min}\n\
             max_clients = {min}\njoin_timeout_ms = 30000\njoin_grace_ms = 0\nstage_timeout_ms = 20000\nparameters = 200\n{extra}\n"
        );
        for (name, pk) in self.names.iter().zip(&self.publics) {
            s.push_str(&format!(
                "[[client]]\nname = \"{name}\"\npublic_key = \"{pk}\"\n"
            ));
        }
        self.write("server.toml", &s)
    }

    /// A client config for client `i`; `tail` is appended (e.g. an `[input]` section).
    fn client_config(&self, i: usize, addr: &str, fp: &str, tail: &str) -> PathBuf {
        self.client_config_with(i, addr, fp, "", tail)
    }

    /// [`Site::client_config`] with top-level settings `top` too.
    fn client_config_with(&self, i: usize, addr: &str, fp: &str, top: &str, tail: &str) -> PathBuf {
        let s = format!(
            "server = \"{addr}\"\nreconnect_attempts = 0\n{top}[trust]\nserver_fingerprint = \"{fp}\"\n[identity]\nkey_file = \"{}.key\"\n{tail}",
            self.names[i]
        );
        self.write(&format!("{}.toml", self.names[i]), &s)
    }

    fn start_server(&self, cfg: &Path) -> (Proc, String, String) {
        let p = Proc::spawn(&["--json", "server", "--config", cfg.to_str().expect("utf8")]);
        let line = p.wait_for(&["listening on", "fingerprint"]);
        let words: Vec<&str> = line.split_whitespace().collect();
        let addr = words[words.iter().position(|w| *w == "on").expect("on") + 1].to_string();
        (p, addr, words.last().expect("fingerprint").to_string())
    }

    fn store(&self) -> Store {
        Store::open(&self.path("data"), Arc::new(SystemClock))
            .expect("store")
            .0
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs to the end: exit code, the last stdout line as JSON (Null if it is not), stderr.
fn run(args: &[&str]) -> (i32, Value, String) {
    let mut p = Proc::spawn(args);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = p.child.try_wait().expect("wait") {
            break s;
        }
        assert!(start.elapsed() < proc::limit(), "no exit: {}", p.log());
        std::thread::sleep(Duration::from_millis(20));
    };
    std::thread::sleep(Duration::from_millis(50));
    let log = p.log();
    let mut out = String::new();
    std::io::Read::read_to_string(&mut p.child.stdout.take().expect("stdout"), &mut out)
        .expect("stdout");
    let v = serde_json::from_str(out.lines().last().unwrap_or("null")).unwrap_or(Value::Null);
    (status.code().unwrap_or(-1), v, log)
}

/// The error text of a refused run: the JSON `error`, else stderr.
fn error_of(v: &Value, log: &str) -> String {
    v["error"]
        .as_str()
        .map_or_else(|| log.to_string(), String::from)
}

fn assert_refused(code: i32, v: &Value, log: &str, needles: &[&str]) -> String {
    let msg = error_of(v, log);
    assert_eq!(code, 2, "exit code 2 (refused); {msg}\n{log}");
    assert_eq!(v["outcome"], "refused", "{v}");
    assert_eq!(v["exit_code"], 2, "{v}");
    for n in needles {
        assert!(msg.contains(n), "message lacks {n:?}: {msg}");
    }
    // No Rust Debug text in what a person reads.
    for leak in ["Some(", "None)", "got None", " { ", "Distributed"] {
        assert!(!msg.contains(leak), "Debug text {leak:?} in: {msg}");
    }
    msg
}

fn f32_file(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

// ---------------------------------------------------------------------------------------------
// Checked too late: a refused start writes nothing.

#[test]
fn a_bad_server_configuration_is_refused_before_anything_is_written() {
    let site = Site::new("server-refused", 2);
    let cases: &[(&str, u64, usize, &[&str])] = &[
        // A [privacy] section without clip_norm: named once, with the fix.
        (
            "[privacy]\nmode = \"distributed\"\nnoise_multiplier = 1.0\n",
            1,
            2,
            &["server.toml", "clip_norm is missing", "clip_norm = 1.0"],
        ),
        // More values than the protocol's vector limit.
        ("", 1, 2, &["server.toml", "rounds.parameters", "268435454"]),
        // More required clients than enrolled.
        (
            "",
            1,
            3,
            &["server.toml", "rounds.min_clients = 3", "only 2"],
        ),
        // No rounds at all.
        ("", 0, 2, &["server.toml", "rounds.count"]),
        // A typo: the TOML error, quoted once.
        ("", 1, 2, &["server.toml", "unknown field `max_frame`"]),
    ];
    for (i, (extra, rounds, min, needles)) in cases.iter().enumerate() {
        let cfg = site.server_config(*rounds, *min, extra);
        if i == 1 {
            let text = std::fs::read_to_string(&cfg).expect("read");
            std::fs::write(
                &cfg,
                text.replace("parameters = 200", "parameters = 300000000"),
            )
            .expect("write");
        }
        if i == 4 {
            let text = std::fs::read_to_string(&cfg).expect("read");
            std::fs::write(&cfg, format!("max_frame = 1\n{text}")).expect("write");
        }
        let (code, v, log) = run(&["--json", "server", "--config", cfg.to_str().expect("utf8")]);
        let msg = assert_refused(code, &v, &log, needles);
        // Each cause once (no "x: x" doubling).
        let first = needles[1];
        assert_eq!(msg.matches(first).count(), 1, "{first:?} twice in: {msg}");
        assert!(
            !site.path("data").exists(),
            "case {i}: a refused start created data_dir"
        );
        assert!(!log.contains("listening"), "case {i}: {log}");
    }
    // An unwritable data_dir (below a regular file) and a port in use.
    let blocker = site.write("blocker", "x");
    let cfg = site.server_config(1, 2, "");
    let text = std::fs::read_to_string(&cfg).expect("read");
    std::fs::write(
        &cfg,
        text.replace("data_dir = \"data\"", "data_dir = \"blocker/data\""),
    )
    .expect("write");
    let (code, v, log) = run(&["--json", "server", "--config", cfg.to_str().expect("utf8")]);
    assert_refused(code, &v, &log, &["server.toml", "data_dir", "blocker"]);
    assert!(blocker.is_file());
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    std::fs::write(
        &cfg,
        text.replace("127.0.0.1:0", &format!("127.0.0.1:{port}")),
    )
    .expect("write");
    let (code, v, log) = run(&["--json", "server", "--config", cfg.to_str().expect("utf8")]);
    assert_refused(
        code,
        &v,
        &log,
        &["server.toml", "listen", &port.to_string()],
    );
    assert!(!site.path("data").exists());
}

#[test]
fn a_bad_client_configuration_is_refused_before_connecting() {
    let site = Site::new("client-refused", 1);
    // Nothing listens at this address: every refusal below must come before connecting.
    let fp = "ab".repeat(32);
    let addr = "127.0.0.1:9";
    let state = "state_dir = \"state\"\n";
    let cases: Vec<(String, Vec<&str>)> = vec![
        // Silent wrong data before: no [input] uploaded seeded pseudo-random values.
        (
            String::new(),
            vec!["hospital-a.toml", "[input]", "kind = \"file\""],
        ),
        (
            "[input]\nkind = \"file\"\npath = \"missing.f32\"\n".into(),
            vec!["hospital-a.toml", "input.path", "missing.f32"],
        ),
        (
            "[input]\nkind = \"file\"\npath = \"odd.f32\"\n".into(),
            vec!["hospital-a.toml", "input.path", "odd.f32", "7 bytes"],
        ),
        (
            "[input]\nkind = \"file\"\npath = \"nan.f32\"\n".into(),
            vec!["hospital-a.toml", "nan.f32", "value 1 is not finite"],
        ),
        (
            "[input]\nkind = \"synthetic\"\nweight = 0\n".into(),
            vec!["hospital-a.toml", "input.weight"],
        ),
        (
            "[train]\ntask = \"spam\"\nrank = 0\n".into(),
            vec!["hospital-a.toml", "train.rank must be in 1..=4096, got 0"],
        ),
        (
            "[train]\ntask = \"spam\"\nlr = 1e30\n".into(),
            vec!["hospital-a.toml", "train.lr must be in (0, 1], got 1e30"],
        ),
    ];
    site.write("odd.f32", "1234567");
    std::fs::write(site.path("nan.f32"), f32_file(&[0.5, f32::NAN])).expect("nan");
    for (tail, needles) in &cases {
        let cfg = site.client_config_with(0, addr, &fp, state, tail);
        let (code, v, log) = run(&["--json", "client", "--config", cfg.to_str().expect("utf8")]);
        assert_refused(code, &v, &log, needles);
        assert!(!site.path("state").exists(), "{tail}: state_dir created");
        assert!(!log.contains("connected"), "{log}");
    }
    // An unwritable state_dir.
    site.write("blocker", "x");
    std::fs::write(site.path("in.f32"), f32_file(&[0.1; 4])).expect("input");
    let cfg = site.client_config_with(
        0,
        addr,
        &fp,
        "state_dir = \"blocker/state\"\n",
        "[input]\nkind = \"file\"\npath = \"in.f32\"\n",
    );
    let (code, v, log) = run(&["--json", "client", "--config", cfg.to_str().expect("utf8")]);
    assert_refused(code, &v, &log, &["hospital-a.toml", "state_dir", "blocker"]);
    // A server address that is no address.
    let cfg = site.client_config(0, "fedlora-server", &fp, "[input]\nkind = \"synthetic\"\n");
    let (code, v, log) = run(&["--json", "client", "--config", cfg.to_str().expect("utf8")]);
    assert_refused(
        code,
        &v,
        &log,
        &["hospital-a.toml", "fedlora-server", "host:port"],
    );
}

// ---------------------------------------------------------------------------------------------
// Exit codes, hostnames, silent wrong data, quiet output: one session of real rounds.

/// Two rounds, three clients: `hospital-a` contributes a file with values beyond the clip and a
/// weight above the bound, connecting by name (`localhost`); the others are synthetic. Every round
/// finishes (exit 0 everywhere), the clipping and the capping are reported, and with `RUST_LOG`
/// unset the server prints a few progress lines naming the clients, not protocol steps.
#[test]
fn a_clean_run_exits_zero_reports_clipping_and_stays_quiet() {
    let site = Site::new("clean", 3);
    let cfg = site.server_config(2, 3, "[protocol]\nclip = 1.0\nweight_bound = 1\n");
    let server = Proc::spawn_logging(
        &["--json", "server", "--config", cfg.to_str().expect("utf8")],
        None,
    );
    let line = server.wait_for(&["listening on", "fingerprint"]);
    let words: Vec<&str> = line.split_whitespace().collect();
    let addr = words[words.iter().position(|w| *w == "on").expect("on") + 1].to_string();
    let fp = words.last().expect("fp").to_string();
    let port = addr.rsplit(':').next().expect("port");
    let mut values = vec![0.25f32; 200];
    values[3] = 1.6;
    values[7] = -1.2;
    std::fs::write(site.path("delta.f32"), f32_file(&values)).expect("delta");
    let clients: Vec<Proc> = (0..3)
        .map(|i| {
            let (at, tail) = if i == 0 {
                (
                    format!("localhost:{port}"),
                    "[input]\nkind = \"file\"\npath = \"delta.f32\"\nweight = 5\n".to_string(),
                )
            } else {
                (
                    addr.clone(),
                    format!("[input]\nkind = \"synthetic\"\nseed = {i}\n"),
                )
            };
            let c = site.client_config(i, &at, &fp, &tail);
            Proc::spawn_logging(
                &["--json", "client", "--config", c.to_str().expect("utf8")],
                None,
            )
        })
        .collect();
    let (code, report) = server.finish();
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["outcome"], "ok");
    assert_eq!(report["exit_code"], 0);
    let rounds = report["rounds"].as_array().expect("rounds");
    assert_eq!(rounds.len(), 2);
    for r in rounds {
        assert_eq!(
            r["status"], "finished",
            "a weight above the bound no longer fails: {r}"
        );
    }
    let mut clients = clients.into_iter();
    let file_client = clients.next().expect("a");
    let log = file_client.log();
    let (code, rep) = file_client.finish();
    assert_eq!(code, 0, "{rep}\n{log}");
    assert_eq!(rep["rounds"][0]["clipped_values"], 2, "{rep}");
    assert!(
        log.contains("exceed the round's per-value clip ±1"),
        "{log}"
    );
    assert!(log.contains("protocol.clip"), "{log}");
    assert!(log.contains("capped at 1"), "{log}");
    for c in clients {
        let log = c.log();
        let (code, rep) = c.finish();
        assert_eq!(code, 0, "{rep}");
        assert!(
            log.contains("synthetic"),
            "the synthetic input is said loudly: {log}"
        );
    }
    let store = site.store();
    assert!(store
        .rounds()
        .expect("rounds")
        .iter()
        .all(|r| r.status == RoundStatus::Finished));
}

#[test]
fn the_server_summary_names_clients_and_says_what_was_applied() {
    let site = Site::new("summary", 2);
    let cfg = site.server_config(1, 2, "");
    // Human output (no --json), default logging.
    let server = Proc::spawn_logging(&["server", "--config", cfg.to_str().expect("utf8")], None);
    let line = server.wait_for(&["listening on", "fingerprint"]);
    let words: Vec<&str> = line.split_whitespace().collect();
    let addr = words[words.iter().position(|w| *w == "on").expect("on") + 1].to_string();
    let fp = words.last().expect("fp").to_string();
    let clients: Vec<Proc> = (0..2)
        .map(|i| {
            let c = site.client_config(i, &addr, &fp, "[input]\nkind = \"synthetic\"\n");
            Proc::spawn_logging(&["client", "--config", c.to_str().expect("utf8")], None)
        })
        .collect();
    let (code, out) = server.finish_text();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("1 of 1 round(s) finished"), "{out}");
    assert!(
        out.contains("2 of 2 clients in the sum: hospital-a, hospital-b"),
        "{out}"
    );
    assert!(out.contains("no DP noise"), "{out}");
    assert!(out.contains("per-value clip ±1"), "{out}");
    assert!(out.contains("aggregates"), "{out}");
    for c in clients {
        let log = c.log();
        let (code, out) = c.finish_text();
        assert_eq!(code, 0, "{out}\n{log}");
        assert!(out.contains("1 of 1 round(s) finished"), "{out}");
        assert!(out.contains("SYNTHETIC"), "{out}");
        assert!(out.contains("global states not written"), "{out}");
        // Quiet: a handful of lines, no per-stage INFO protocol steps.
        assert!(!log.contains("stage open"), "{log}");
        assert!(log.lines().count() <= 8, "too chatty:\n{log}");
    }
}

#[test]
fn the_server_is_quiet_by_default_and_detailed_with_v() {
    for (verbose, chatty) in [(false, false), (true, true)] {
        let site = Site::new(if verbose { "v" } else { "quiet" }, 2);
        let cfg = site.server_config(1, 2, "");
        let mut args = vec!["--json", "server", "--config", cfg.to_str().expect("utf8")];
        if verbose {
            args.push("-v");
        }
        let server = Proc::spawn_logging(&args, None);
        let line = server.wait_for(&["listening on", "fingerprint"]);
        let words: Vec<&str> = line.split_whitespace().collect();
        let addr = words[words.iter().position(|w| *w == "on").expect("on") + 1].to_string();
        let fp = words.last().expect("fp").to_string();
        let clients: Vec<Proc> = (0..2)
            .map(|i| {
                let c = site.client_config(i, &addr, &fp, "[input]\nkind = \"synthetic\"\n");
                Proc::spawn_logging(
                    &["--json", "client", "--config", c.to_str().expect("utf8")],
                    None,
                )
            })
            .collect();
        server.wait_for(&["round 0 (vector) finished"]);
        let log = server.log();
        let (code, _) = server.finish();
        assert_eq!(code, 0);
        assert!(
            log.contains("round 0 (vector) started with 2 clients: hospital-a, hospital-b"),
            "{log}"
        );
        assert_eq!(log.contains("stage open"), chatty, "-v {verbose}:\n{log}");
        if !verbose {
            assert!(log.lines().count() <= 6, "too chatty by default:\n{log}");
        }
        for c in clients {
            assert_eq!(c.finish().0, 0);
        }
    }
}

#[test]
fn an_aborted_round_exits_three_on_both_sides_and_the_report_says_so() {
    let site = Site::new("aborted", 2);
    let cfg = site.server_config(1, 2, "");
    let text = std::fs::read_to_string(&cfg).expect("read");
    std::fs::write(
        &cfg,
        text.replace("stage_timeout_ms = 20000", "stage_timeout_ms = 2000"),
    )
    .expect("write");
    let (server, addr, fp) = site.start_server(&cfg);
    let cfgs: Vec<PathBuf> = (0..2)
        .map(|i| site.client_config(i, &addr, &fp, "[input]\nkind = \"synthetic\"\n"))
        .collect();
    let survivor = Proc::spawn(&[
        "--json",
        "client",
        "--config",
        cfgs[0].to_str().expect("utf8"),
    ]);
    let victim = Proc::spawn(&[
        "--json",
        "client",
        "--config",
        cfgs[1].to_str().expect("utf8"),
        "--fail-before",
        "share",
    ]);
    let (code, report) = server.finish();
    assert_eq!(code, 3, "{report}");
    assert_eq!(report["outcome"], "rounds_aborted");
    assert_eq!(report["exit_code"], 3);
    assert_eq!(report["rounds"][0]["status"], "aborted");
    let (code, rep) = survivor.finish();
    assert_eq!(code, 3, "{rep}");
    assert_eq!(rep["outcome"], "rounds_aborted");
    assert_eq!(rep["rounds"][0]["outcome"], "aborted");
    let mut victim = victim;
    let start = Instant::now();
    while victim.child.try_wait().expect("wait").is_none() {
        assert!(start.elapsed() < proc::limit());
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// Signals.

/// SIGTERM mid-round: the server cancels the round (clients get the typed abort at once, not after
/// their idle timeout), records it in the store and the audit log, prints its report and exits 143.
#[test]
fn sigterm_cancels_the_round_records_it_and_reports() {
    let site = Site::new("sigterm", 3);
    let cfg = site.server_config(3, 3, "");
    let (server, addr, fp) = site.start_server(&cfg);
    let clients: Vec<Proc> = (0..3)
        .map(|i| {
            let c = site.client_config(i, &addr, &fp, "[input]\nkind = \"synthetic\"\n");
            let mut args = vec!["--json", "client", "--config", c.to_str().expect("utf8")];
            if i == 2 {
                // Holds the server in the upload stage until its 20 s deadline.
                args.extend(["--stall-before", "upload"]);
            }
            Proc::spawn(&args.iter().map(|s| &**s).collect::<Vec<_>>())
        })
        .collect();
    server.wait_for(&["stage open", "stage=upload"]);
    let sent = Instant::now();
    server.signal("TERM");
    let (code, report) = server.finish();
    assert!(
        sent.elapsed() < Duration::from_secs(10),
        "graceful, not a deadline"
    );
    assert_eq!(code, 143, "{report}");
    assert_eq!(report["outcome"], "interrupted");
    assert_eq!(report["exit_code"], 143);
    assert_eq!(report["shutdown"]["signal"], "SIGTERM");
    let rounds = report["rounds"].as_array().expect("rounds");
    assert_eq!(
        rounds.len(),
        1,
        "the remaining rounds were not run: {report}"
    );
    assert_eq!(rounds[0]["status"], "aborted");
    assert!(
        rounds[0]["abort_reason"]
            .as_str()
            .is_some_and(|r| r.contains("server shutting down (SIGTERM)")),
        "{report}"
    );
    let store = site.store();
    let r0 = store.round(0).expect("store").expect("round 0");
    assert_eq!(r0.status, RoundStatus::Aborted);
    let audit = store.audit_events().expect("audit");
    assert!(
        audit
            .iter()
            .any(|(_, e, d)| e == "server_shutdown" && d.contains("SIGTERM")),
        "{audit:?}"
    );
    // The two answering clients learn at once; the round is `interrupted` (not counted toward
    // max_rounds), and they exit promptly (reconnect_attempts = 0) instead of idling.
    for c in clients.into_iter().take(2) {
        let start = Instant::now();
        let mut c = c;
        while c.child.try_wait().expect("wait").is_none() {
            assert!(start.elapsed() < Duration::from_secs(10), "{}", c.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        let log = c.log();
        assert!(log.contains("round 0: interrupted"), "{log}");
        assert!(log.contains("server shutting down (SIGTERM)"), "{log}");
    }
}

#[test]
fn sigint_while_waiting_for_clients_stops_at_once_with_130() {
    let site = Site::new("sigint", 2);
    let cfg = site.server_config(1, 2, "");
    let (server, _addr, _fp) = site.start_server(&cfg);
    std::thread::sleep(Duration::from_millis(300));
    server.signal("INT");
    let (code, report) = server.finish();
    assert_eq!(code, 130, "{report}");
    assert_eq!(report["shutdown"]["signal"], "SIGINT");
    assert_eq!(report["rounds"].as_array().map(Vec::len), Some(0));
    let audit = site.store().audit_events().expect("audit");
    assert!(
        audit.iter().any(|(_, e, _)| e == "server_shutdown"),
        "{audit:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Messages.

#[test]
fn a_wrong_pinned_fingerprint_says_expected_and_presented() {
    let site = Site::new("pin", 2);
    let cfg = site.server_config(1, 2, "");
    let (mut server, addr, fp) = site.start_server(&cfg);
    let wrong = "00".repeat(32);
    let c = site.client_config(0, &addr, &wrong, "[input]\nkind = \"synthetic\"\n");
    let (code, v, log) = run(&["--json", "client", "--config", c.to_str().expect("utf8")]);
    assert_eq!(code, 1, "{log}");
    let msg = error_of(&v, &log);
    assert!(msg.contains(&wrong), "expected: {msg}");
    assert!(msg.contains(&fp), "presented: {msg}");
    assert!(msg.contains("trust.server_fingerprint"), "{msg}");
    assert!(!msg.contains("ApplicationVerificationFailure"), "{msg}");
    server.kill();
}

#[test]
fn keygen_escapes_the_name_or_refuses_it_and_writes_nothing() {
    let site = Site::new("keygen", 0);
    let out = site.path("st-marys");
    let name = r#"St. "Mary's" \ Ward 3"#;
    let (code, v, log) = run(&[
        "--json",
        "keygen",
        "--out",
        out.to_str().expect("utf8"),
        "--name",
        name,
    ]);
    assert_eq!(code, 0, "{log}");
    let entry = v["enrollment"].as_str().expect("entry");
    let parsed = ServerConfig::from_toml(entry).expect("the entry parses back");
    assert_eq!(parsed.clients[0].name, name);
    let bad = site.path("bad");
    let (code, v, log) = run(&[
        "--json",
        "keygen",
        "--out",
        bad.to_str().expect("utf8"),
        "--name",
        "two\nlines",
    ]);
    assert_refused(code, &v, &log, &["--name", "control characters"]);
    assert!(!bad.with_extension("key").exists());
    assert!(!bad.with_extension("pub").exists());
    // An existing identity is not replaced without --force.
    let (code, v, log) = run(&["--json", "keygen", "--out", out.to_str().expect("utf8")]);
    assert_refused(code, &v, &log, &["st-marys.key", "--force"]);
}

// ---------------------------------------------------------------------------------------------
// Ranges: the same refusal, in the same words, in every subcommand, before anything runs.

#[test]
fn ranges_are_refused_the_same_way_in_every_subcommand() {
    let site = Site::new("ranges", 0);
    let out = site.path("out");
    let o = out.to_str().expect("utf8");
    let threads = "--threads must be in 1..=1024, got 0";
    let rank = "--rank must be in 1..=4096, got 0";
    let lr = "--lr must be in (0, 1], got 1e30";
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["train", "--task", "spam", "--threads", "0", "--out", o],
            threads,
        ),
        (vec!["eval", "--task", "spam", "--threads", "0"], threads),
        (
            vec!["federate", "--task", "spam", "--threads", "0", "--out", o],
            threads,
        ),
        (vec!["limits", "--threads", "0"], threads),
        (vec!["simulate", "--threads", "0"], threads),
        (
            vec!["train", "--task", "spam", "--rank", "0", "--out", o],
            rank,
        ),
        (
            vec!["federate", "--task", "spam", "--rank", "0", "--out", o],
            rank,
        ),
        (
            vec!["layout", "--task", "spam", "--rank", "0", "--out", o],
            rank,
        ),
        (
            vec!["train", "--task", "spam", "--lr", "1e30", "--out", o],
            lr,
        ),
        (
            vec!["federate", "--task", "spam", "--lr", "1e30", "--out", o],
            lr,
        ),
        (vec!["demo", "--lr", "1e30"], lr),
        (
            vec!["demo", "--rounds", "0"],
            "--rounds must be in 1..=1000000, got 0",
        ),
        (
            vec!["demo", "--synthetic", "--rounds", "0"],
            "--rounds must be in",
        ),
        (
            vec!["demo", "--synthetic", "--parameters", "0"],
            "--parameters must be in 1..=",
        ),
        (
            vec!["demo", "--synthetic", "--stage-timeout-ms", "0"],
            "--stage-timeout-ms must be in 1..=",
        ),
        (
            vec!["limits", "--megabytes", "0"],
            "--megabytes must be in 1..=65536, got 0",
        ),
        (
            vec!["train", "--task", "spam", "--steps", "0", "--out", o],
            "--steps must be in",
        ),
    ];
    let temp_demos = || {
        std::fs::read_dir(std::env::temp_dir())
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().starts_with("fedlora-demo-"))
                    .count()
            })
            .unwrap_or(0)
    };
    let demos_before = temp_demos();
    for (args, want) in &cases {
        let mut argv = vec!["--json"];
        argv.extend(args.iter().copied());
        let started = Instant::now();
        let (code, v, log) = run(&argv);
        assert_refused(code, &v, &log, &[want]);
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{args:?} refused only after {:?}",
            started.elapsed()
        );
        assert!(!out.exists(), "{args:?} wrote {}", out.display());
    }
    assert!(
        temp_demos() <= demos_before,
        "a refused demo left a temporary directory"
    );
    // clap's own refusals (an unknown flag) are code 2 and one JSON object too.
    let (code, v, log) = run(&["--json", "train", "--task", "spam", "--no-such-flag"]);
    assert_refused(code, &v, &log, &["--no-such-flag"]);
}

#[test]
fn train_out_is_checked_before_training() {
    let site = Site::new("train-out", 0);
    site.write("file", "x");
    let out = site.path("file/adapter");
    let started = Instant::now();
    let (code, v, log) = run(&[
        "--json",
        "train",
        "--task",
        "spam",
        "--steps",
        "1000",
        "--out",
        out.to_str().expect("utf8"),
    ]);
    assert_refused(code, &v, &log, &["--out", "file", "not a directory"]);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "checked before training"
    );
    let layout = site.path("file/layout.json");
    let (code, v, log) = run(&[
        "--json",
        "layout",
        "--task",
        "spam",
        "--out",
        layout.to_str().expect("utf8"),
    ]);
    assert_refused(code, &v, &log, &["--out", "not a directory"]);
}

// ---------------------------------------------------------------------------------------------
// Silent wrong data in training and evaluation (real MiniLM, tiny data).

const TINY: &[&str] = &[
    "--task",
    "spam",
    "--train-examples",
    "8",
    "--eval-examples",
    "8",
    "--max-len",
    "16",
    "--batch-size",
    "4",
];

/// Overwrites every f32 of a safetensors file with NaN (header kept).
fn poison_safetensors(path: &Path) {
    let mut bytes = std::fs::read(path).expect("read");
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8")) as usize;
    for chunk in bytes[8 + n..].chunks_exact_mut(4) {
        chunk.copy_from_slice(&f32::NAN.to_le_bytes());
    }
    std::fs::write(path, bytes).expect("write");
}

#[test]
fn eval_refuses_a_nan_adapter_and_its_json_has_only_eval_fields() {
    let site = Site::new("nan", 0);
    let adapter = site.path("adapter");
    let mut argv = vec!["--json", "train", "--steps", "2", "--out"];
    let a = adapter.to_str().expect("utf8").to_string();
    argv.push(&a);
    argv.extend_from_slice(TINY);
    let (code, v, log) = run(&argv);
    assert_eq!(code, 0, "{v}\n{log}");
    // A sound adapter scores; the report carries evaluation fields only.
    let mut eval = vec!["--json", "eval", "--adapter", &a];
    eval.extend_from_slice(&TINY[..2]);
    eval.extend_from_slice(&TINY[4..]);
    let (code, v, log) = run(&eval);
    assert_eq!(code, 0, "{log}");
    assert!(v["accuracy"].is_number() && v["loss"].is_number(), "{v}");
    for key in ["steps", "final_loss"] {
        assert!(v.get(key).is_none(), "eval --json carries {key}: {v}");
    }
    // All-NaN weights: refused, no score.
    poison_safetensors(&adapter.join("adapter_model.safetensors"));
    let (code, v, log) = run(&eval);
    assert_eq!(code, 1, "{v}\n{log}");
    let msg = error_of(&v, &log);
    assert!(msg.contains("non-finite"), "{msg}");
    assert!(msg.contains(&a), "names the adapter: {msg}");
    assert!(v.get("accuracy").is_none(), "{v}");
}

#[test]
fn a_rank_above_the_layer_width_is_refused() {
    let site = Site::new("wide", 0);
    let out = site.path("layout.json");
    let (code, v, log) = run(&[
        "--json",
        "layout",
        "--task",
        "spam",
        "--rank",
        "1000",
        "--out",
        out.to_str().expect("utf8"),
    ]);
    assert_refused(
        code,
        &v,
        &log,
        &["LoRA rank 1000", "width 384", "at most 384"],
    );
    assert!(!out.exists());
}

// ---------------------------------------------------------------------------------------------
// Hostnames.

#[test]
fn an_unresolvable_server_name_is_a_clear_failure() {
    let site = Site::new("dns", 1);
    let c = site.client_config(
        0,
        "no-such-host.invalid:4433",
        &"ab".repeat(32),
        "[input]\nkind = \"synthetic\"\n",
    );
    let (code, v, log) = run(&["--json", "client", "--config", c.to_str().expect("utf8")]);
    assert_eq!(code, 1, "{log}");
    let msg = error_of(&v, &log);
    assert!(
        msg.contains("resolving the server address no-such-host.invalid:4433"),
        "{msg}"
    );
    assert_eq!(v["outcome"], "failed");
}
