//! Checks that a directory or file can be written, made before any real write so that a start
//! refused for an unwritable path leaves nothing behind. A directory that exists is probed with a
//! uniquely named file, created and removed at once (permission bits do not tell: ACLs, read-only
//! mounts and ownership decide); a directory that does not exist yet needs its nearest existing
//! ancestor to be a writable directory, and is not created.

use std::path::{Path, PathBuf};

/// Why a path cannot be written.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {why}")]
pub struct NotWritable {
    /// The path as given.
    pub path: String,
    /// What is wrong, with the fix where there is one.
    pub why: String,
}

fn refuse(path: &Path, why: impl Into<String>) -> NotWritable {
    NotWritable {
        path: path.display().to_string(),
        why: why.into(),
    }
}

/// Checks that `dir` is, or can be created as, a directory this process can write in.
pub fn check_writable_dir(dir: &Path) -> Result<(), NotWritable> {
    if dir.exists() {
        if !dir.is_dir() {
            return Err(refuse(dir, "exists and is not a directory"));
        }
        return probe(dir).map_err(|e| refuse(dir, format!("cannot write in this directory: {e}")));
    }
    let ancestor =
        nearest_existing(dir).ok_or_else(|| refuse(dir, "no parent of this path exists"))?;
    if !ancestor.is_dir() {
        return Err(refuse(
            dir,
            format!("{} is not a directory", ancestor.display()),
        ));
    }
    probe(&ancestor).map_err(|e| {
        refuse(
            dir,
            format!(
                "cannot be created: {} is not writable ({e})",
                ancestor.display()
            ),
        )
    })
}

/// Checks that `file` can be written: not a directory, and its directory writable (or creatable).
pub fn check_writable_file(file: &Path) -> Result<(), NotWritable> {
    if file.is_dir() {
        return Err(refuse(file, "is a directory, not a file"));
    }
    match file.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => check_writable_dir(parent),
        None => check_writable_dir(Path::new(".")),
    }
}

fn nearest_existing(path: &Path) -> Option<PathBuf> {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().ok()?.join(path)
    };
    absolute
        .ancestors()
        .find(|a| a.exists())
        .map(Path::to_path_buf)
}

/// Creates and removes a uniquely named file in `dir`.
fn probe(dir: &Path) -> std::io::Result<()> {
    let name = format!(
        ".fedlora-write-check-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    );
    let path = dir.join(name);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)?;
    std::fs::remove_file(&path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writable_missing_and_blocked_paths() {
        let base = std::env::temp_dir().join(format!("fedlora-paths-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).expect("dir");
        // A directory to be created later: accepted, and not created by the check.
        let later = base.join("a/b/c");
        check_writable_dir(&later).expect("creatable");
        assert!(!base.join("a").exists());
        check_writable_file(&later.join("x.bin")).expect("file");
        // Below a file: refused, naming the path.
        let file = base.join("f");
        std::fs::write(&file, b"x").expect("file");
        let e = check_writable_dir(&file.join("sub")).expect_err("below a file");
        assert!(e.to_string().contains("is not a directory"), "{e}");
        assert!(check_writable_dir(&file).is_err());
        assert!(check_writable_file(&base).is_err());
        // Nothing left behind by the probes.
        let left: Vec<_> = std::fs::read_dir(&base).expect("ls").collect();
        assert_eq!(left.len(), 1);
        let _ = std::fs::remove_dir_all(&base);
    }
}
