//! The run directory of `fedlora federate`: the per-round records (CSV and JSONL), the checkpoint
//! that lets an interrupted run continue, the global adapter in PEFT format. Every file is written
//! under a temporary name and renamed, so a crash never leaves half a file; the records are written
//! last, so they are the commit point of a round.

use std::path::{Path, PathBuf};

use anyhow::Context;
use fedlora_aggregate::{GlobalState, NamedTensors};
use fedlora_federation::{Checkpoint, RoundRecord};
use serde::{Deserialize, Serialize};

/// What must match for a run to be continued: every setting that changes its results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// The settings, as text (flags normalised).
    pub settings: serde_json::Value,
}

/// The baseline (untrained) score, kept with the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    /// Metric.
    pub metric: f64,
    /// Loss.
    pub loss: f64,
    /// Examples.
    pub examples: usize,
}

#[derive(Debug, Serialize, Deserialize)]
struct Records {
    baseline: Baseline,
    rounds: Vec<RoundRecord>,
}

/// The directory.
#[derive(Debug)]
pub struct RunDir {
    root: PathBuf,
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

impl RunDir {
    /// The directory (not created yet).
    pub fn new(root: &Path) -> Self {
        RunDir {
            root: root.to_path_buf(),
        }
    }

    /// The root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn state(&self) -> PathBuf {
        self.root.join("state")
    }

    /// The global adapter's directory.
    pub fn global_dir(&self) -> PathBuf {
        self.root.join("global")
    }

    /// The clients' adapters' directory.
    pub fn clients_dir(&self) -> PathBuf {
        self.root.join("clients")
    }

    /// Whether a previous run is here.
    pub fn has_run(&self) -> bool {
        self.state().join("records.json").exists()
    }

    /// Creates the directories (the first side effect of a run).
    pub fn create(&self, restart: bool) -> anyhow::Result<()> {
        if restart && self.root.exists() {
            for sub in ["state", "global", "clients"] {
                let p = self.root.join(sub);
                if p.exists() {
                    std::fs::remove_dir_all(&p)
                        .with_context(|| format!("removing {}", p.display()))?;
                }
            }
            for f in ["rounds.csv", "rounds.jsonl"] {
                let _ = std::fs::remove_file(self.root.join(f));
            }
        }
        std::fs::create_dir_all(self.state())
            .with_context(|| format!("creating {}", self.state().display()))
    }

    /// Checks that a previous run here has the same settings.
    pub fn check_fingerprint(&self, fp: &Fingerprint) -> anyhow::Result<()> {
        let path = self.state().join("fingerprint.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let old: Fingerprint =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        if &old != fp {
            let diff: Vec<String> = match (&old.settings, &fp.settings) {
                (serde_json::Value::Object(a), serde_json::Value::Object(b)) => b
                    .iter()
                    .filter(|(k, v)| a.get(*k) != Some(v))
                    .map(|(k, v)| {
                        format!(
                            "{k} (was {}, now {v})",
                            a.get(k).unwrap_or(&serde_json::Value::Null)
                        )
                    })
                    .collect(),
                _ => vec!["format".into()],
            };
            anyhow::bail!(
                "{} holds a run with other settings: {}; continue it with the same flags, use another --out, or pass --restart to discard it",
                self.root.display(),
                diff.join(", ")
            );
        }
        Ok(())
    }

    /// Loads the checkpoint of a previous run: the global state, what clients kept, the records.
    pub fn load(&self, clients: usize) -> anyhow::Result<(Checkpoint, Baseline)> {
        let rp = self.state().join("records.json");
        let records: Records = serde_json::from_slice(
            &std::fs::read(&rp).with_context(|| format!("reading {}", rp.display()))?,
        )
        .with_context(|| format!("parsing {}", rp.display()))?;
        let gp = self.state().join("global.fgs");
        let global = GlobalState::decode(
            &std::fs::read(&gp).with_context(|| format!("reading {}", gp.display()))?,
        )
        .with_context(|| format!("decoding {}", gp.display()))?;
        let want = records.rounds.last().map(|r| r.global_sha256.clone());
        let have = hex::encode(global.sha256());
        if want.as_ref().is_some_and(|w| *w != have) {
            anyhow::bail!(
                "{}: the saved global state (sha256 {have}) is not the one the last record names ({}); the checkpoint is damaged: pass --restart",
                gp.display(),
                want.unwrap_or_default()
            );
        }
        let locals = self.load_locals(clients)?;
        Ok((
            Checkpoint {
                global,
                locals,
                records: records.rounds,
            },
            records.baseline,
        ))
    }

    fn load_locals(&self, clients: usize) -> anyhow::Result<Vec<Option<NamedTensors>>> {
        let dir = self.state().join("locals");
        let mut out = vec![None; clients];
        if !dir.exists() {
            return Ok(out);
        }
        for (i, slot) in out.iter_mut().enumerate() {
            let p = dir.join(format!("{i}.fltensor"));
            if p.exists() {
                let bytes =
                    std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
                *slot = Some(
                    NamedTensors::decode(&bytes)
                        .with_context(|| format!("decoding {}", p.display()))?,
                );
            }
        }
        Ok(out)
    }

    /// Saves the fingerprint and the baseline of a new run.
    pub fn start(
        &self,
        fp: &Fingerprint,
        baseline: &Baseline,
        global: &GlobalState,
    ) -> anyhow::Result<()> {
        write_atomic(
            &self.state().join("fingerprint.json"),
            &serde_json::to_vec_pretty(fp)?,
        )?;
        write_atomic(&self.state().join("global.fgs"), &global.encode())?;
        self.write_records(baseline, &[])
    }

    /// Saves a round: what clients kept, the global state, then the records (the commit point)
    /// and their CSV and JSONL copies.
    pub fn save_round(&self, cp: &Checkpoint, baseline: &Baseline) -> anyhow::Result<()> {
        if cp.locals.iter().any(Option::is_some) {
            let dir = self.state().join("locals");
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for (i, l) in cp.locals.iter().enumerate() {
                if let Some(l) = l {
                    write_atomic(&dir.join(format!("{i}.fltensor")), &l.encode())?;
                }
            }
        }
        write_atomic(&self.state().join("global.fgs"), &cp.global.encode())?;
        self.write_records(baseline, &cp.records)
    }

    fn write_records(&self, baseline: &Baseline, rounds: &[RoundRecord]) -> anyhow::Result<()> {
        let rec = Records {
            baseline: baseline.clone(),
            rounds: rounds.to_vec(),
        };
        write_atomic(
            &self.state().join("records.json"),
            &serde_json::to_vec_pretty(&rec)?,
        )?;
        let mut csv = String::from(RoundRecord::CSV_HEADER);
        csv.push('\n');
        let mut jsonl = String::new();
        for r in rounds {
            csv.push_str(&r.csv_row());
            csv.push('\n');
            jsonl.push_str(&serde_json::to_string(r)?);
            jsonl.push('\n');
        }
        write_atomic(&self.root.join("rounds.csv"), csv.as_bytes())?;
        write_atomic(&self.root.join("rounds.jsonl"), jsonl.as_bytes())
    }
}
