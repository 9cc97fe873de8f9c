//! The server's store: embedded SQLite (rounds, participants, dropouts, abort reasons, aggregate
//! hashes, protocol parameters, and the audit log), plus aggregate files written atomically
//! (write, fsync, rename, fsync the directory). Individual uploads are never stored.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};

use crate::clock::Clock;

/// Errors from the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("sqlite: {0}")]
    Sql(#[from] rusqlite::Error),
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The database holds something this version cannot read.
    #[error("corrupt store: {0}")]
    Corrupt(String),
}

/// How a round ended (or that it is still running).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoundStatus {
    /// Started, not finished: after a restart this means it was interrupted.
    Running,
    /// Aggregate produced.
    Finished,
    /// Aborted with a recorded reason.
    Aborted,
}

impl RoundStatus {
    /// The status as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            RoundStatus::Running => "running",
            RoundStatus::Finished => "finished",
            RoundStatus::Aborted => "aborted",
        }
    }

    fn parse(s: &str) -> Result<Self, StoreError> {
        Ok(match s {
            "running" => RoundStatus::Running,
            "finished" => RoundStatus::Finished,
            "aborted" => RoundStatus::Aborted,
            other => return Err(StoreError::Corrupt(format!("round status {other:?}"))),
        })
    }
}

/// One row of the `rounds` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoundRecord {
    /// Round number.
    pub round: u64,
    /// Status.
    pub status: RoundStatus,
    /// Abort reason, when aborted.
    pub abort_reason: Option<String>,
    /// SHA-256 (hex) of the aggregate file, when finished.
    pub aggregate_sha256: Option<String>,
    /// Protocol parameters (JSON).
    pub params_json: String,
    /// Number of surviving clients, when finished.
    pub survivors: Option<u32>,
}

/// Reason recorded for a round interrupted by a server crash or kill.
pub const INTERRUPTED: &str = "interrupted: server restarted mid-round";

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    status TEXT NOT NULL CHECK (status IN ('running', 'finished', 'aborted')),
    started_ms INTEGER NOT NULL,
    ended_ms INTEGER,
    params_json TEXT NOT NULL,
    abort_reason TEXT,
    aggregate_sha256 TEXT,
    aggregate_path TEXT,
    survivors INTEGER
);
CREATE TABLE IF NOT EXISTS participants (
    round INTEGER NOT NULL REFERENCES rounds(round),
    client_id INTEGER NOT NULL,
    identity TEXT NOT NULL,
    public_key TEXT NOT NULL,
    PRIMARY KEY (round, client_id)
);
CREATE TABLE IF NOT EXISTS dropouts (
    round INTEGER NOT NULL REFERENCES rounds(round),
    client_id INTEGER NOT NULL,
    stage TEXT NOT NULL,
    PRIMARY KEY (round, client_id)
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    round INTEGER,
    event TEXT NOT NULL,
    detail TEXT NOT NULL
);
"#;

/// The SQLite store.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    dir: PathBuf,
    clock: Arc<dyn Clock>,
}

impl Store {
    /// Opens (creating) `dir/fedlora.sqlite3`. Any round left `running` by a previous process is
    /// marked aborted with [`INTERRUPTED`]; returns the store and the rounds so marked.
    pub fn open(dir: &Path, clock: Arc<dyn Clock>) -> Result<(Self, Vec<u64>), StoreError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        std::fs::create_dir_all(dir.join("aggregates")).map_err(io_err(dir))?;
        let conn = Connection::open(dir.join("fedlora.sqlite3"))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.execute_batch(SCHEMA)?;
        let store = Self {
            conn,
            dir: dir.to_path_buf(),
            clock,
        };
        let interrupted = store.recover()?;
        Ok((store, interrupted))
    }

    fn recover(&self) -> Result<Vec<u64>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT round FROM rounds WHERE status = 'running' ORDER BY round")?;
        let rounds = stmt
            .query_map([], |r| r.get::<_, i64>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        let mut out = Vec::new();
        for r in rounds {
            let r = u64::try_from(r).map_err(|_| StoreError::Corrupt("negative round".into()))?;
            self.abort_round(r, INTERRUPTED)?;
            self.audit(Some(r), "round_interrupted", INTERRUPTED)?;
            out.push(r);
        }
        Ok(out)
    }

    /// The deployment's session id (random, created once and kept).
    pub fn session_id(&self) -> Result<[u8; 16], StoreError> {
        let existing: Option<String> = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'session_id'", [], |r| {
                r.get(0)
            })
            .optional()?;
        if let Some(hex_id) = existing {
            let mut id = [0u8; 16];
            hex::decode_to_slice(hex_id, &mut id)
                .map_err(|_| StoreError::Corrupt("session_id".into()))?;
            return Ok(id);
        }
        let id: [u8; 16] = rand::random();
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES ('session_id', ?1)",
            params![hex::encode(id)],
        )?;
        Ok(id)
    }

    /// The number the next round gets: one past the highest recorded (0 on a fresh store).
    pub fn next_round(&self) -> Result<u64, StoreError> {
        let max: Option<i64> = self
            .conn
            .query_row("SELECT MAX(round) FROM rounds", [], |r| r.get(0))?;
        Ok(max.map(|m| m as u64 + 1).unwrap_or(0))
    }

    /// Records a round start with its parameters and participants, in one transaction.
    pub fn begin_round(
        &mut self,
        round: u64,
        params_json: &str,
        participants: &[(u32, String, String)],
    ) -> Result<(), StoreError> {
        let now = self.now();
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO rounds (round, status, started_ms, params_json) VALUES (?1, 'running', ?2, ?3)",
            params![round as i64, now, params_json],
        )?;
        for (id, name, key) in participants {
            tx.execute(
                "INSERT INTO participants (round, client_id, identity, public_key) VALUES (?1, ?2, ?3, ?4)",
                params![round as i64, id, name, key],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Records a client dropped in `stage`.
    pub fn record_dropout(
        &self,
        round: u64,
        client_id: u32,
        stage: &str,
    ) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT OR IGNORE INTO dropouts (round, client_id, stage) VALUES (?1, ?2, ?3)",
            params![round as i64, client_id, stage],
        )?;
        Ok(())
    }

    /// Writes the aggregate atomically, then marks the round finished with its hash. Returns the hash.
    pub fn finish_round(
        &self,
        round: u64,
        aggregate: &[u8],
        survivors: u32,
    ) -> Result<String, StoreError> {
        let path = self
            .dir
            .join("aggregates")
            .join(format!("round-{round:06}.bin"));
        write_atomic(&path, aggregate).map_err(io_err(&path))?;
        let hash = hex::encode(Sha256::digest(aggregate));
        self.conn.execute(
            "UPDATE rounds SET status = 'finished', ended_ms = ?2, aggregate_sha256 = ?3, aggregate_path = ?4,
             survivors = ?5 WHERE round = ?1",
            params![round as i64, self.now(), hash, path.display().to_string(), survivors],
        )?;
        Ok(hash)
    }

    /// Marks a round aborted with a reason.
    pub fn abort_round(&self, round: u64, reason: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE rounds SET status = 'aborted', ended_ms = ?2, abort_reason = ?3 WHERE round = ?1",
            params![round as i64, self.now(), reason],
        )?;
        Ok(())
    }

    /// Appends an audit-log entry (metadata only: never payload bytes).
    pub fn audit(&self, round: Option<u64>, event: &str, detail: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO audit (at_ms, round, event, detail) VALUES (?1, ?2, ?3, ?4)",
            params![self.now(), round.map(|r| r as i64), event, detail],
        )?;
        Ok(())
    }

    /// A round's record.
    pub fn round(&self, round: u64) -> Result<Option<RoundRecord>, StoreError> {
        let row = self
            .conn
            .query_row(
                "SELECT status, abort_reason, aggregate_sha256, params_json, survivors FROM rounds WHERE round = ?1",
                params![round as i64],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, Option<String>>(1)?,
                        r.get::<_, Option<String>>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, Option<u32>>(4)?,
                    ))
                },
            )
            .optional()?;
        row.map(
            |(status, abort_reason, aggregate_sha256, params_json, survivors)| {
                Ok(RoundRecord {
                    round,
                    status: RoundStatus::parse(&status)?,
                    abort_reason,
                    aggregate_sha256,
                    params_json,
                    survivors,
                })
            },
        )
        .transpose()
    }

    /// All rounds, oldest first.
    pub fn rounds(&self) -> Result<Vec<RoundRecord>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT round FROM rounds ORDER BY round")?;
        let ids = stmt
            .query_map([], |r| r.get::<_, i64>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        ids.into_iter()
            .filter_map(|r| self.round(r as u64).transpose())
            .collect()
    }

    /// Dropped client ids of a round with their stage, by id.
    pub fn dropouts(&self, round: u64) -> Result<Vec<(u32, String)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT client_id, stage FROM dropouts WHERE round = ?1 ORDER BY client_id")?;
        let rows = stmt.query_map(params![round as i64], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Participants of a round: (client id, identity name).
    pub fn participants(&self, round: u64) -> Result<Vec<(u32, String)>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT client_id, identity FROM participants WHERE round = ?1 ORDER BY client_id",
        )?;
        let rows = stmt.query_map(params![round as i64], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Audit events (event, detail), oldest first.
    pub fn audit_events(&self) -> Result<Vec<(Option<u64>, String, String)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT round, event, detail FROM audit ORDER BY id")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, Option<i64>>(0)?.map(|v| v as u64),
                r.get(1)?,
                r.get(2)?,
            ))
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Directory holding the database and aggregates.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn now(&self) -> i64 {
        i64::try_from(self.clock.now_unix_ms()).unwrap_or(i64::MAX)
    }
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, fsync, rename over
/// `path`, fsync the directory. Readers see the old file or the new one, never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Ok(d) = std::fs::File::open(dir) {
        d.sync_all()?;
    }
    Ok(())
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.display().to_string();
    move |source| StoreError::Io { path, source }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::FakeClock;

    fn tmp() -> PathBuf {
        std::env::temp_dir().join(format!("fedlora-store-{}", rand::random::<u64>()))
    }

    #[test]
    fn round_lifecycle_and_restart_recovery() {
        let dir = tmp();
        let clock = Arc::new(FakeClock::new(1000));
        let session;
        {
            let (mut s, interrupted) = Store::open(&dir, clock.clone()).expect("open");
            assert!(interrupted.is_empty());
            session = s.session_id().expect("session");
            assert_eq!(s.next_round().expect("next"), 0);
            let parts = vec![
                (0, "a".to_string(), "aa".to_string()),
                (1, "b".to_string(), "bb".to_string()),
            ];
            s.begin_round(0, "{\"t\":2}", &parts).expect("begin");
            s.record_dropout(0, 1, "masked_input").expect("drop");
            let hash = s.finish_round(0, b"aggregate bytes", 1).expect("finish");
            assert_eq!(hash, hex::encode(Sha256::digest(b"aggregate bytes")));
            let file = dir.join("aggregates/round-000000.bin");
            assert_eq!(
                std::fs::read(&file).expect("aggregate file"),
                b"aggregate bytes"
            );
            s.begin_round(1, "{}", &parts).expect("begin 1");
            // Killed here: round 1 stays 'running'.
        }
        let (s, interrupted) = Store::open(&dir, clock).expect("reopen");
        assert_eq!(interrupted, vec![1]);
        assert_eq!(s.session_id().expect("session"), session);
        assert_eq!(s.next_round().expect("next"), 2);
        let r0 = s.round(0).expect("r0").expect("exists");
        assert_eq!(r0.status, RoundStatus::Finished);
        assert_eq!(r0.survivors, Some(1));
        let r1 = s.round(1).expect("r1").expect("exists");
        assert_eq!(r1.status, RoundStatus::Aborted);
        assert_eq!(r1.abort_reason.as_deref(), Some(INTERRUPTED));
        assert_eq!(
            s.dropouts(0).expect("dropouts"),
            vec![(1, "masked_input".to_string())]
        );
        assert_eq!(s.participants(1).expect("participants").len(), 2);
        let audit = s.audit_events().expect("audit");
        assert!(audit
            .iter()
            .any(|(r, e, _)| *r == Some(1) && e == "round_interrupted"));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tmp();
        std::fs::create_dir_all(&dir).expect("dir");
        let p = dir.join("x.bin");
        write_atomic(&p, b"one").expect("w1");
        write_atomic(&p, b"two").expect("w2");
        assert_eq!(std::fs::read(&p).expect("read"), b"two");
        let names: Vec<_> = std::fs::read_dir(&dir)
            .expect("ls")
            .filter_map(|e| e.ok())
            .collect();
        assert_eq!(names.len(), 1);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
