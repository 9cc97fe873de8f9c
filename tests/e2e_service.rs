//! End-to-end tests of the networked service across processes on 127.0.0.1: the `fedlora` binary
//! as server and clients (and, for forged traffic, an attacker in this test process speaking the
//! frame protocol directly). Each test bounds its own run time and asserts the exact outcome.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedlora_secagg::wire::{decode_server, encode_client, ClientMessage, ServerMessage};
use fedlora_secagg::{Client, ClientInput};
use fedlora_service::auth::Ed25519Authenticator;
use fedlora_service::client::synthetic_input;
use fedlora_service::clock::SystemClock;
use fedlora_service::framing::{Header, Kind};
use fedlora_service::identity::{IdentityKey, PublicIdentity};
use fedlora_service::session::{stage_code, ClientSession, RoundStart, PAYLOAD_OFFSET};
use fedlora_service::store::{RoundStatus, Store, INTERRUPTED};
use fedlora_service::tls::ServerTrust;
use serde_json::Value;

#[path = "support/proc.rs"]
mod proc;
use proc::{limit, Proc};

/// A scratch deployment: a directory, client identities made with `fedlora keygen`, configs.
struct Fixture {
    dir: PathBuf,
    names: Vec<String>,
    publics: Vec<String>,
}

impl Fixture {
    fn new(tag: &str, clients: usize) -> Fixture {
        let dir = std::env::temp_dir().join(format!("fedlora-e2e-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let mut names = Vec::new();
        let mut publics = Vec::new();
        for i in 0..clients {
            let name = format!("client-{i}");
            let (code, v) = run_to_end(&[
                "--json",
                "keygen",
                "--out",
                &dir.join(&name).display().to_string(),
            ]);
            assert_eq!(code, 0, "{v}");
            publics.push(v["public_key"].as_str().expect("public_key").to_string());
            names.push(name);
        }
        Fixture {
            dir,
            names,
            publics,
        }
    }

    /// Writes the server config (all fixture clients enrolled, plus `extra` enrolled keys).
    fn server_config(
        &self,
        rounds: u64,
        min: usize,
        stage_timeout_ms: u64,
        params: u32,
        extra: &[(String, String)],
    ) -> PathBuf {
        let mut s = format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\n[rounds]\ncount = {rounds}\nmin_clients = {min}\n\
             max_clients = {min}\njoin_timeout_ms = 30000\njoin_grace_ms = 0\nstage_timeout_ms = {stage_timeout_ms}\n\
             parameters = {params}\n"
        );
        let all = self
            .names
            .iter()
            .cloned()
            .zip(self.publics.iter().cloned())
            .chain(extra.iter().cloned());
        for (name, pk) in all {
            s.push_str(&format!(
                "[[client]]\nname = \"{name}\"\npublic_key = \"{pk}\"\n"
            ));
        }
        let p = self.dir.join("server.toml");
        std::fs::write(&p, s).expect("write server config");
        p
    }

    fn client_config(&self, i: usize, addr: &str, fingerprint: &str) -> PathBuf {
        let s = format!(
            "server = \"{addr}\"\nreconnect_delay_ms = 200\n[trust]\nserver_fingerprint = \"{fingerprint}\"\n[identity]\nkey_file = \"{}.key\"\n\
             [input]\nkind = \"synthetic\"\nseed = {i}\n",
            self.names[i]
        );
        let p = self.dir.join(format!("{}.toml", self.names[i]));
        std::fs::write(&p, s).expect("write client config");
        p
    }

    fn start_server(&self, cfg: &Path, extra: &[&str]) -> (Proc, String, String) {
        let mut args = vec!["--json", "server", "--config", cfg.to_str().expect("utf8")];
        args.extend_from_slice(extra);
        let p = Proc::spawn(&args);
        let line = p.wait_for(&["listening on", "fingerprint"]);
        let words: Vec<&str> = line.split_whitespace().collect();
        let addr = words[words.iter().position(|w| *w == "on").expect("on") + 1].to_string();
        let fp = words.last().expect("fingerprint").to_string();
        (p, addr, fp)
    }

    fn start_client(&self, i: usize, addr: &str, fp: &str, extra: &[&str]) -> Proc {
        let cfg = self.client_config(i, addr, fp);
        let mut args = vec!["--json", "client", "--config", cfg.to_str().expect("utf8")];
        args.extend_from_slice(extra);
        Proc::spawn(&args)
    }

    fn store(&self) -> Store {
        Store::open(&self.dir.join("data"), Arc::new(SystemClock))
            .expect("open store")
            .0
    }

    /// Checks the round's aggregate file against the plain mean of the survivors' inputs.
    fn check_aggregate(&self, round: &Value, params: usize) {
        let r = round["round"].as_u64().expect("round");
        let bytes = std::fs::read(
            self.dir
                .join("data/aggregates")
                .join(format!("round-{r:06}.bin")),
        )
        .expect("aggregate");
        let secure: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(secure.len(), params);
        let survivors: Vec<u64> = round["survivors"]
            .as_array()
            .expect("survivors")
            .iter()
            .filter_map(Value::as_u64)
            .collect();
        let mut plain = vec![0f64; params];
        for &c in &survivors {
            for (p, v) in plain.iter_mut().zip(synthetic_input(c, r, params)) {
                *p += f64::from(v);
            }
        }
        let bound = round["error_bound"].as_f64().expect("bound");
        let k = survivors.len() as f64;
        let max_err = secure
            .iter()
            .zip(&plain)
            .map(|(a, b)| (f64::from(*a) - b / k).abs())
            .fold(0.0, f64::max);
        assert!(max_err <= bound, "max error {max_err} > bound {bound}");
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run_to_end(args: &[&str]) -> (i32, Value) {
    Proc::spawn(args).finish()
}

fn dropped(round: &Value) -> Vec<(u64, String)> {
    round["dropped"]
        .as_array()
        .expect("dropped")
        .iter()
        .map(|d| {
            (
                d[0].as_u64().expect("id"),
                d[1].as_str().expect("stage").to_string(),
            )
        })
        .collect()
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .expect("array")
        .iter()
        .filter_map(Value::as_u64)
        .collect()
}

#[test]
fn clients_aggregate_exactly_over_two_rounds() {
    let f = Fixture::new("exact", 4);
    let cfg = f.server_config(2, 4, 20_000, 1000, &[]);
    let (server, addr, fp) = f.start_server(&cfg, &[]);
    let clients: Vec<Proc> = (0..4).map(|i| f.start_client(i, &addr, &fp, &[])).collect();
    let (code, report) = server.finish();
    assert_eq!(code, 0);
    let rounds = report["rounds"].as_array().expect("rounds");
    assert_eq!(rounds.len(), 2);
    for (k, r) in rounds.iter().enumerate() {
        assert_eq!(r["round"].as_u64(), Some(k as u64));
        assert_eq!(r["status"], "finished");
        assert_eq!(ids(&r["survivors"]), vec![0, 1, 2, 3]);
        assert!(dropped(r).is_empty());
        assert_eq!(r["rejected"], 0);
        f.check_aggregate(r, 1000);
    }
    for c in clients {
        let (code, rep) = c.finish();
        assert_eq!(code, 0, "{rep}");
        assert_eq!(rep["server_done"], true);
        let got: Vec<&str> = rep["rounds"]
            .as_array()
            .expect("rounds")
            .iter()
            .map(|r| r["outcome"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(got, vec!["finished", "finished"]);
        for (cr, sr) in rep["rounds"].as_array().expect("rounds").iter().zip(rounds) {
            assert_eq!(
                cr["aggregate_sha256"], sr["aggregate_sha256"],
                "every client got the server's aggregate"
            );
        }
    }
    let store = f.store();
    assert!(store
        .rounds()
        .expect("rounds")
        .iter()
        .all(|r| r.status == RoundStatus::Finished));
}

/// Waits (bounded) for a process that is expected to exit on its own, and returns its exit code.
fn exit_code(mut p: Proc) -> i32 {
    let start = Instant::now();
    let status = loop {
        if let Some(s) = p.child.try_wait().expect("wait") {
            break s;
        }
        assert!(start.elapsed() < limit());
        std::thread::sleep(Duration::from_millis(20));
    };
    status.code().unwrap_or(-1)
}

/// One round of 4 clients (threshold 3) where the clients in `victims` die right before sending
/// their message for `stage`; returns the server's round report and exit code, and the clients'.
fn round_with_deaths(
    tag: &str,
    stage: &str,
    victims: &[usize],
) -> (Fixture, Value, i32, Vec<(i32, Value)>) {
    let f = Fixture::new(tag, 4);
    let cfg = f.server_config(1, 4, 1_500, 500, &[]);
    let (server, addr, fp) = f.start_server(&cfg, &[]);
    let clients: Vec<Proc> = (0..4)
        .map(|i| {
            let extra: Vec<&str> = if victims.contains(&i) {
                vec!["--fail-before", stage]
            } else {
                vec![]
            };
            f.start_client(i, &addr, &fp, &extra)
        })
        .collect();
    let (code, report) = server.finish();
    assert_eq!(report["exit_code"], code, "the report says the exit code");
    let outcomes: Vec<(i32, Value)> = clients
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            if victims.contains(&i) {
                (exit_code(c), Value::Null)
            } else {
                c.finish()
            }
        })
        .collect();
    let round = report["rounds"][0].clone();
    (f, round, code, outcomes)
}

#[test]
fn one_client_killed_at_each_stage_round_completes() {
    for (stage, survivors) in [
        ("advertise", vec![0, 1, 2]),
        ("share", vec![0, 1, 2]),
        ("upload", vec![0, 1, 2]),
        ("unmask", vec![0, 1, 2, 3]),
    ] {
        let (f, round, code, outcomes) = round_with_deaths(&format!("above-{stage}"), stage, &[3]);
        assert_eq!(code, 0, "every round finished");
        assert_eq!(round["status"], "finished", "stage {stage}: {round}");
        assert_eq!(ids(&round["survivors"]), survivors, "stage {stage}");
        assert_eq!(
            dropped(&round),
            vec![(3, stage.to_string())],
            "stage {stage}"
        );
        f.check_aggregate(&round, 500);
        assert_eq!(outcomes[3].0, 86, "victim exits as killed");
        for (code, rep) in &outcomes[..3] {
            assert_eq!(*code, 0);
            assert_eq!(
                rep["rounds"][0]["outcome"], "finished",
                "stage {stage}: {rep}"
            );
        }
    }
}

/// A client killed half-way through streaming its masked input (30,000 parameters: a 90 KB frame,
/// streamed into the sum as it arrives) is taken back out when the stage closes: the round
/// finishes with the other three, exactly.
#[test]
fn client_killed_mid_upload_is_taken_back_out_of_the_sum() {
    let f = Fixture::new("mid-upload", 4);
    let cfg = f.server_config(1, 4, 3_000, 30_000, &[]);
    let (server, addr, fp) = f.start_server(&cfg, &[]);
    let clients: Vec<Proc> = (0..4)
        .map(|i| {
            let extra: &[&str] = if i == 3 { &["--fail-mid-upload"] } else { &[] };
            f.start_client(i, &addr, &fp, extra)
        })
        .collect();
    let (code, report) = server.finish();
    assert_eq!(code, 0);
    let round = report["rounds"][0].clone();
    assert_eq!(round["status"], "finished", "{round}");
    assert_eq!(ids(&round["survivors"]), vec![0, 1, 2]);
    assert_eq!(dropped(&round), vec![(3, "upload".to_string())]);
    f.check_aggregate(&round, 30_000);
    let mut outcomes = clients.into_iter();
    for c in outcomes.by_ref().take(3) {
        let (code, rep) = c.finish();
        assert_eq!(code, 0);
        assert_eq!(rep["rounds"][0]["outcome"], "finished", "{rep}");
    }
    let victim = outcomes.next().expect("victim");
    assert_eq!(exit_code(victim), 86, "victim exits as killed");
    let log = f
        .store()
        .audit_events()
        .expect("audit log")
        .into_iter()
        .map(|(_, event, detail)| format!("{event}: {detail}"))
        .collect::<Vec<_>>()
        .join("\n");
    // Half its bytes were in the sum when the deadline came; the server says it took them out.
    assert!(
        log.contains("upload_discarded: client 3: masked input unfinished")
            || log.contains("upload_cancelled: client 3: connection lost mid-upload"),
        "{log}"
    );
}

#[test]
fn two_clients_killed_at_each_stage_round_aborts_below_threshold() {
    for stage in ["advertise", "share", "upload", "unmask"] {
        let (f, round, code, outcomes) =
            round_with_deaths(&format!("below-{stage}"), stage, &[2, 3]);
        assert_eq!(code, 3, "a round aborted: exit code 3");
        assert_eq!(round["status"], "aborted", "stage {stage}: {round}");
        assert_eq!(
            round["abort_reason"].as_str(),
            Some(format!("too few survivors after stage {stage}: 2 < threshold 3").as_str()),
            "stage {stage}"
        );
        assert_eq!(
            dropped(&round),
            vec![(2, stage.to_string()), (3, stage.to_string())]
        );
        assert!(
            !f.dir.join("data/aggregates/round-000000.bin").exists(),
            "no aggregate on abort"
        );
        for (code, rep) in &outcomes[..2] {
            assert_eq!(*code, 3, "the clients' round aborted too");
            assert_eq!(rep["outcome"], "rounds_aborted");
            assert_eq!(
                rep["rounds"][0]["outcome"], "aborted",
                "stage {stage}: {rep}"
            );
            assert_eq!(
                rep["rounds"][0]["reason"], round["abort_reason"],
                "every client gets the typed reason"
            );
        }
        let rec = f.store().round(0).expect("store").expect("round 0");
        assert_eq!(rec.status, RoundStatus::Aborted);
    }
}

#[test]
fn server_killed_mid_round_restarts_and_runs_next_round() {
    let f = Fixture::new("restart", 3);
    let cfg = f.server_config(1, 3, 60_000, 500, &[]);
    let (mut server, addr, fp) = f.start_server(&cfg, &[]);
    // Client 2 stops answering before uploading (connection kept open), so the server sits in the
    // upload stage until its 60 s deadline.
    let mut clients: Vec<Proc> = (0..3)
        .map(|i| {
            f.start_client(
                i,
                &addr,
                &fp,
                if i == 2 {
                    &["--stall-before", "upload"]
                } else {
                    &[]
                },
            )
        })
        .collect();
    server.wait_for(&["stage open", "stage=upload"]);
    server.kill();
    for c in &mut clients {
        c.kill();
    }
    let (server2, addr2, fp2) = f.start_server(&cfg, &["--listen", &addr]);
    assert_eq!(addr2, addr);
    assert_eq!(fp2, fp, "the generated certificate is persisted");
    let clients2: Vec<Proc> = (0..3).map(|i| f.start_client(i, &addr, &fp, &[])).collect();
    let (code, report) = server2.finish();
    assert_eq!(code, 0);
    assert_eq!(ids(&report["interrupted_rounds"]), vec![0]);
    let round = &report["rounds"][0];
    assert_eq!(round["round"], 1);
    assert_eq!(round["status"], "finished");
    f.check_aggregate(round, 500);
    for c in clients2 {
        assert_eq!(c.finish().0, 0);
    }
    let store = f.store();
    let r0 = store.round(0).expect("store").expect("round 0");
    assert_eq!(r0.status, RoundStatus::Aborted);
    assert_eq!(r0.abort_reason.as_deref(), Some(INTERRUPTED));
    assert_eq!(
        store.round(1).expect("store").expect("round 1").status,
        RoundStatus::Finished
    );
}

/// Clients whose server dies mid-round notice it (the server goes silent: their 15 s idle timeout)
/// and reconnect by themselves to the restarted server at the same address, record the
/// interrupted round as failed and take part in the next one.
#[test]
fn clients_reconnect_to_a_restarted_server() {
    let f = Fixture::new("reconnect", 3);
    let cfg = f.server_config(1, 3, 60_000, 500, &[]);
    let (mut server, addr, fp) = f.start_server(&cfg, &[]);
    let mut staller = f.start_client(2, &addr, &fp, &["--stall-before", "upload"]);
    let clients: Vec<Proc> = (0..2).map(|i| f.start_client(i, &addr, &fp, &[])).collect();
    server.wait_for(&["stage open", "stage=upload"]);
    server.kill();
    staller.kill();
    // The next server needs only the two clients that are still running.
    let cfg2 = f.server_config(1, 2, 60_000, 500, &[]);
    let (server2, addr2, fp2) = f.start_server(&cfg2, &["--listen", &addr]);
    assert_eq!((addr2.as_str(), fp2.as_str()), (addr.as_str(), fp.as_str()));
    let (code, report) = server2.finish();
    assert_eq!(code, 0);
    assert_eq!(ids(&report["interrupted_rounds"]), vec![0]);
    let round = &report["rounds"][0];
    assert_eq!(round["round"], 1);
    assert_eq!(round["status"], "finished", "{round}");
    assert_eq!(ids(&round["survivors"]), vec![0, 1]);
    f.check_aggregate(round, 500);
    for c in clients {
        let (code, rep) = c.finish();
        assert_eq!(code, 3, "round 0 was cut short: {rep}");
        assert_eq!(rep["connections"], 2, "{rep}");
        let rounds = rep["rounds"].as_array().expect("rounds");
        assert_eq!(rounds.len(), 2, "{rep}");
        assert_eq!(rounds[0]["round"], 0);
        assert_eq!(rounds[0]["outcome"], "interrupted");
        assert!(
            rounds[0]["reason"]
                .as_str()
                .is_some_and(|r| r.starts_with("connection lost")),
            "{rep}"
        );
        assert_eq!(rounds[1]["round"], 1);
        assert_eq!(rounds[1]["outcome"], "finished");
    }
}

#[test]
fn unenrolled_client_and_wrong_certificate_are_refused() {
    let f = Fixture::new("refused", 2);
    let cfg = f.server_config(1, 2, 10_000, 100, &[]);
    let (server, addr, fp) = f.start_server(&cfg, &[]);
    // A stranger: valid key file, not enrolled.
    let (code, _) = run_to_end(&[
        "--json",
        "keygen",
        "--out",
        &f.dir.join("stranger").display().to_string(),
    ]);
    assert_eq!(code, 0);
    let stranger_cfg = f.dir.join("stranger.toml");
    std::fs::write(
        &stranger_cfg,
        format!("server = \"{addr}\"\n[trust]\nserver_fingerprint = \"{fp}\"\n[identity]\nkey_file = \"stranger.key\"\n[input]\nkind = \"synthetic\"\n"),
    )
    .expect("write");
    let (code, v) = run_to_end(&[
        "--json",
        "client",
        "--config",
        stranger_cfg.to_str().expect("utf8"),
    ]);
    assert_eq!(code, 1);
    let err = v["error"].as_str().expect("error");
    assert!(
        err.starts_with("refused by server: unknown identity"),
        "{err}"
    );
    // An enrolled client pinning the wrong certificate refuses the server.
    let wrong = "00".repeat(32);
    let c0 = f.client_config(0, &addr, &fp);
    let (code, v) = run_to_end(&[
        "--json",
        "client",
        "--config",
        c0.to_str().expect("utf8"),
        "--server-fingerprint",
        &wrong,
    ]);
    assert_eq!(code, 1);
    let err = v["error"].as_str().expect("error");
    assert!(err.contains("certificate"), "{err}");
    // The round still runs with the enrolled clients.
    let clients: Vec<Proc> = (0..2).map(|i| f.start_client(i, &addr, &fp, &[])).collect();
    let (code, report) = server.finish();
    assert_eq!(code, 0);
    assert_eq!(report["rounds"][0]["status"], "finished");
    for c in clients {
        assert_eq!(c.finish().0, 0);
    }
    let audit = f.store().audit_events().expect("audit");
    let refused: Vec<_> = audit
        .iter()
        .filter(|(_, e, _)| e == "connection_refused")
        .collect();
    assert_eq!(refused.len(), 1, "{audit:?}");
    assert!(refused[0].2.contains("unknown identity"));
}

#[test]
fn malformed_oversized_replayed_and_forged_messages_are_rejected() {
    let f = Fixture::new("attack", 3);
    let attacker = IdentityKey::generate();
    let extra = [("zz-attacker".to_string(), attacker.public().to_hex())];
    let cfg = f.server_config(1, 4, 5_000, 500, &extra);
    let (server, addr, fp) = f.start_server(&cfg, &[]);
    let clients: Vec<Proc> = (0..3).map(|i| f.start_client(i, &addr, &fp, &[])).collect();

    let rt = fedlora_service::runtime().expect("rt");
    rt.block_on(async {
        let fp_bytes = fedlora_service::tls::parse_fingerprint(&fp).expect("fp");
        let mut s = ClientSession::connect(
            addr.parse().expect("addr"),
            "localhost",
            &ServerTrust::Pin(fp_bytes),
            &attacker,
            64 << 20,
            Duration::from_secs(10),
        )
        .await
        .expect("attacker is enrolled");
        let (h, body) = s.recv().await.expect("recv").expect("round start");
        assert_eq!(h.kind, Kind::RoundStart);
        let (round, me) = (h.round, h.sender);
        assert_eq!(me, 3, "names sort: client-0..2, then zz-attacker");
        let start: RoundStart = serde_json::from_slice(&body[PAYLOAD_OFFSET..]).expect("roster");
        let peers = start
            .peers
            .iter()
            .map(|(i, k)| (*i, PublicIdentity::from_hex(k).expect("key")))
            .collect();
        let (_, body) = s.recv().await.expect("recv").expect("setup");
        let setup = decode_server(&body[PAYLOAD_OFFSET..]).expect("decode");
        assert!(matches!(setup, ServerMessage::Setup(_)));

        let session = s.session;
        let adv = move |stage: u8| Header {
            kind: Kind::Protocol,
            session,
            round,
            stage,
            sender: me,
        };
        // 1. Malformed: garbage where a protocol message belongs.
        s.send(&adv(0), &[0xde, 0xad, 0xbe, 0xef])
            .await
            .expect("send");
        // 2. Forged signature: keys signed by a key that is not the attacker's enrolled identity.
        let other = Arc::new(IdentityKey::generate());
        let mut forged = Client::new(
            me,
            ClientInput {
                values: vec![0.0; 500],
                weight: 1,
            },
            &mut rand::rng(),
        )
        .with_authenticator(Box::new(Ed25519Authenticator::client(
            other,
            Default::default(),
        )));
        forged.handle_message(setup.clone()).expect("forged client");
        let forged_msg = forged.poll_transmit().expect("advertise");
        s.send(&adv(0), &encode_client(&forged_msg).expect("encode"))
            .await
            .expect("send");
        // 3. Forged sender: claims to be client 0.
        let honest_id = Arc::new(attacker_clone(&attacker));
        let mut real = Client::new(
            me,
            ClientInput {
                values: vec![0.0; 500],
                weight: 1,
            },
            &mut rand::rng(),
        )
        .with_authenticator(Box::new(Ed25519Authenticator::client(honest_id, peers)));
        real.handle_message(setup).expect("client");
        let msg = real.poll_transmit().expect("advertise");
        assert!(matches!(msg, ClientMessage::AdvertiseKeys(_)));
        let bytes = encode_client(&msg).expect("encode");
        let mut as_zero = adv(0);
        as_zero.sender = 0;
        s.send(&as_zero, &bytes).await.expect("send");
        // 4. Out of order: the right message labelled with a later stage.
        s.send(&adv(stage_code(fedlora_secagg::Stage::MaskedInput)), &bytes)
            .await
            .expect("send");
        // 5. The genuine message is accepted; 6. its replay is rejected.
        s.send(&adv(0), &bytes).await.expect("send");
        s.send(&adv(0), &bytes).await.expect("send");
        // 7. Another session's frame.
        let mut other_session: Header = adv(0);
        other_session.session = [0xaa; 16];
        s.send(&other_session, &bytes).await.expect("send");
        // 8. Oversized: a length prefix past the limit; the server must cut the connection.
        s.send_raw(&u32::MAX.to_be_bytes()).await.expect("send");
        let closed =
            fedlora_service::tokio::time::timeout(Duration::from_secs(10), s.conn.closed())
                .await
                .expect("server closes");
        assert!(closed.to_string().contains("frame violation"), "{closed}");
    });

    let (code, report) = server.finish();
    assert_eq!(code, 0);
    let round = &report["rounds"][0];
    assert_eq!(round["status"], "finished", "{round}");
    assert_eq!(ids(&round["survivors"]), vec![0, 1, 2]);
    assert_eq!(dropped(round), vec![(3, "share".to_string())]);
    assert_eq!(
        round["rejected"], 6,
        "malformed, bad signature, forged sender, out of order, replay, wrong session"
    );
    f.check_aggregate(round, 500);
    for c in clients {
        assert_eq!(c.finish().0, 0);
    }
    let audit = f.store().audit_events().expect("audit");
    let rejected: Vec<&str> = audit
        .iter()
        .filter(|(_, e, _)| e == "rejected")
        .map(|(_, _, d)| d.as_str())
        .collect();
    assert_eq!(rejected.len(), 6, "{rejected:#?}");
    assert!(rejected[0].contains("malformed message"), "{}", rejected[0]);
    assert!(rejected[1].contains("bad signature"), "{}", rejected[1]);
    assert!(rejected[2].contains("sender 0 forged"), "{}", rejected[2]);
    assert!(
        rejected[3].contains("stage 2 while stage 0 is open"),
        "{}",
        rejected[3]
    );
    assert!(
        rejected[4].contains("replay of round 0 stage 0 from client 3"),
        "{}",
        rejected[4]
    );
    assert!(rejected[5].contains("wrong session"), "{}", rejected[5]);
    assert!(
        audit
            .iter()
            .any(|(_, e, d)| e == "frame_violation" && d.contains("exceeds the maximum")),
        "{audit:?}"
    );
}

fn attacker_clone(k: &IdentityKey) -> IdentityKey {
    IdentityKey::from_seed(&k.seed())
}

#[test]
fn client_drops_in_one_round_and_rejoins_the_next() {
    let f = Fixture::new("rejoin", 4);
    let cfg = f.server_config(2, 4, 1_500, 300, &[]);
    let (server, addr, fp) = f.start_server(&cfg, &[]);
    let stayers: Vec<Proc> = (0..3).map(|i| f.start_client(i, &addr, &fp, &[])).collect();
    let mut leaver = f.start_client(3, &addr, &fp, &["--fail-before", "upload"]);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = leaver.child.try_wait().expect("wait") {
            break s;
        }
        assert!(start.elapsed() < limit());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        status.code(),
        Some(86),
        "dropped as if killed before uploading"
    );
    // The same identity comes back (a new process, a new connection) for the next round.
    let back = f.start_client(3, &addr, &fp, &[]);
    let (code, report) = server.finish();
    assert_eq!(code, 0);
    let rounds = report["rounds"].as_array().expect("rounds");
    assert_eq!(rounds.len(), 2);
    assert_eq!(rounds[0]["status"], "finished");
    assert_eq!(ids(&rounds[0]["survivors"]), vec![0, 1, 2]);
    assert_eq!(dropped(&rounds[0]), vec![(3, "upload".to_string())]);
    assert_eq!(rounds[1]["status"], "finished");
    assert_eq!(ids(&rounds[1]["survivors"]), vec![0, 1, 2, 3]);
    assert!(dropped(&rounds[1]).is_empty());
    for r in rounds {
        f.check_aggregate(r, 300);
    }
    let (code, rep) = back.finish();
    assert_eq!(code, 0);
    let outcomes: Vec<(u64, &str)> = rep["rounds"]
        .as_array()
        .expect("rounds")
        .iter()
        .map(|r| {
            (
                r["round"].as_u64().unwrap_or(99),
                r["outcome"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(outcomes, vec![(1, "finished")]);
    for c in stayers {
        let (code, rep) = c.finish();
        assert_eq!(code, 0);
        assert_eq!(rep["rounds"].as_array().map(Vec::len), Some(2));
    }
}
