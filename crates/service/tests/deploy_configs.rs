//! Every sample configuration shipped in deploy/ parses and validates with the real loaders
//! (unknown fields are errors, so a typo in a sample fails here).

use std::path::{Path, PathBuf};

use fedlora_service::config::{ClientConfig, ServerConfig};

fn toml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read deploy/") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            toml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "toml") {
            out.push(path);
        }
    }
}

#[test]
fn every_sample_config_in_deploy_parses() {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy");
    let mut files = Vec::new();
    toml_files(&deploy, &mut files);
    files.sort();
    let (mut servers, mut clients) = (0, 0);
    for f in &files {
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.starts_with("server") {
            let cfg = ServerConfig::load(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            assert!(cfg.rounds.count >= 1);
            if name.contains("federated") {
                // Its layout file is shipped next to it and names a real model's projections.
                let (rule, layout) = cfg
                    .federation
                    .as_ref()
                    .expect("[federation]")
                    .validate()
                    .expect("layout");
                assert_eq!(
                    (rule.name(), layout.rank, layout.layers.len()),
                    ("frozen-a", 8, 12)
                );
            }
            servers += 1;
        } else if name.starts_with("client") {
            let cfg = ClientConfig::load(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            assert!(
                cfg.trust.to_trust().is_ok() || cfg.trust.ca_cert.is_some(),
                "{}",
                f.display()
            );
            if name.contains("federated") {
                let t = cfg.train.as_ref().expect("[train]");
                assert_eq!((t.task.as_str(), t.rank), ("spam", 8));
            }
            clients += 1;
        } else {
            panic!(
                "{}: sample configs must be named server*.toml or client*.toml",
                f.display()
            );
        }
    }
    assert_eq!((servers, clients), (4, 3), "{files:?}");
}
