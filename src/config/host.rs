//! What `run` needs from the machine, checked before it starts (and by `check`), short of
//! opening devices and sockets: the identity files, the data directory, the spool files.
//!
//! Each problem is one line at the key it concerns, saying what to do about it
//! (`run m2m-gateway keygen --dir …`). Nothing here changes the machine: directories are
//! not created and spool files are opened read-only; `run` then creates and opens them.
//!
//! Invariant: these are the checks `run` depends on. Loading the identity and opening a
//! spool belong to higher layers (link, spool), so the caller hands them in as a
//! [`Machine`]: the gateway's is the very code `run` starts with, so a configuration
//! `check` accepts does not fail at start for a reason `check` could have seen.

use std::ops::Range;
use std::path::Path;

use super::Checker;
use super::document::Raw;
use crate::model::{Links, Plc};

/// The checks of what `run` opens that only higher layers know how to do.
/// `gateway::Preflight` is the implementation `check` and `run` use.
pub trait Machine {
    /// Loads the identity in `dir` as `run` will; `Err`: one line saying what is wrong
    /// and what to do (`run m2m-gateway keygen --dir …`).
    fn identity(&self, dir: &Path) -> Result<(), String>;
    /// Checks, without changing it, that the existing spool file `file` will open;
    /// `Err`: what is wrong.
    fn spool(&self, file: &Path) -> Result<(), String>;
}

/// Checks the identity, data directory and spool files of `links` and `plcs` (the
/// validated forms of `raw`).
pub(super) fn check(
    raw: &Raw,
    links: Option<&Links>,
    plcs: &[Plc],
    machine: &dyn Machine,
    check: &mut Checker,
) {
    if let (Some(links), Some(raw_link)) = (links, &raw.link) {
        const PATH: &str = "link";
        if let Err(problem) = machine.identity(&links.identity_dir) {
            check.report(raw_link.identity.span(), PATH, problem);
        }
        let data_dir_ok = writable_dir(&links.data_dir)
            .map_err(|e| check.report(raw_link.data_dir.span(), PATH, format!("data_dir {e}")))
            .is_ok();
        for peer in &links.peers {
            let Some(r) = raw.peer.iter().find(|r| r.name() == peer.name) else { continue };
            let path = format!("peer {:?}", peer.name);
            let data_dir = data_dir_ok.then_some(links.data_dir.as_path());
            spool(&peer.spool, data_dir, r.spool_span(), &path, machine, check);
        }
    }
    for plc in plcs {
        let Some(r) = raw.plc.iter().find(|r| r.name() == plc.name) else { continue };
        let path = format!("plc {:?}", plc.name);
        let data_dir = links.map(|l| l.data_dir.as_path());
        spool(&plc.spool, data_dir, r.spool_span(), &path, machine, check);
    }
}

/// `dir` is a directory this process may create files in, or can be created.
fn writable_dir(dir: &Path) -> Result<(), String> {
    use rustix::fs::{Access, access};
    let mode = Access::WRITE_OK | Access::EXEC_OK;
    if dir.exists() {
        if !dir.is_dir() {
            return Err(format!("{} is not a directory", dir.display()));
        }
        return access(dir, mode).map_err(|e| {
            format!(
                "{} is not writable by this user ({e}): give the gateway's user write access to it, or choose another directory",
                dir.display()
            )
        });
    }
    // Missing: `run` creates it, with its missing parents, inside the nearest existing one.
    let Some(existing) = dir.ancestors().skip(1).find(|a| a.exists()) else {
        return Ok(());
    };
    let existing = if existing.as_os_str().is_empty() { Path::new(".") } else { existing };
    if !existing.is_dir() {
        return Err(format!(
            "{} cannot be created: {} is not a directory",
            dir.display(),
            existing.display()
        ));
    }
    access(existing, mode).map_err(|e| {
        format!(
            "{} cannot be created: {} is not writable by this user ({e}): create it and give the gateway's user write access",
            dir.display(),
            existing.display()
        )
    })
}

/// A spool file: an existing one must open as a spool and be writable; a missing one
/// must be creatable. `data_dir` (when it was found usable) is not checked again.
fn spool(
    file: &Path,
    data_dir: Option<&Path>,
    span: Range<usize>,
    path: &str,
    machine: &dyn Machine,
    check: &mut Checker,
) {
    if file.exists() {
        if let Err(e) = machine.spool(file) {
            check.report(
                span,
                path,
                format!("{e}: move the file away (its unsent values are then lost) or fix the spool path"),
            );
            return;
        }
        if let Err(e) = rustix::fs::access(file, rustix::fs::Access::WRITE_OK) {
            check.report(
                span,
                path,
                format!(
                    "spool {} is not writable by this user ({e}): give the gateway's user write access to it",
                    file.display()
                ),
            );
        }
        return;
    }
    let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) else { return };
    if Some(dir) == data_dir {
        return;
    }
    if let Err(e) = writable_dir(dir) {
        check.report(span, path, format!("spool directory {e}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_that_exist_or_can_be_made_are_writable() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(writable_dir(dir.path()), Ok(()));
        assert_eq!(writable_dir(&dir.path().join("a/b/c")), Ok(()), "run creates missing parents");
        let file = dir.path().join("file");
        std::fs::write(&file, "x").expect("write");
        let err = writable_dir(&file).expect_err("a file is no directory");
        assert!(err.ends_with("file is not a directory"), "{err}");
        let err = writable_dir(&file.join("data")).expect_err("nothing can be made under a file");
        assert!(
            err.contains("data cannot be created: ") && err.ends_with("file is not a directory"),
            "{err}"
        );
    }
}
