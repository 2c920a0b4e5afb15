//! uid/gid maps of the child's user namespace.
//!
//! An ordinary user gets its own id as root of the namespace plus its subordinate range from
//! `/etc/subuid` and `/etc/subgid`, written by the setuid helpers `newuidmap`/`newgidmap`
//! (shadow-utils) as RootlessKit does: `newuidmap PID 0 UID 1 1 START COUNT`. Root maps the
//! whole id space onto itself by writing `/proc/PID/{uid,gid}_map` directly (RootlessKit
//! refuses to run as root; this is an extension).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::unistd::{Gid, Pid, Uid, User};

use crate::sys::find_program;

/// Where subordinate uids are listed.
pub const SUBUID_FILE: &str = "/etc/subuid";
/// Where subordinate gids are listed.
pub const SUBGID_FILE: &str = "/etc/subgid";

/// Why the id maps cannot be planned or written.
#[derive(Debug, thiserror::Error)]
pub enum IdMapError {
    #[error(
        "no subordinate ids for user {user:?} (id {id}) in {file}; add a line like \
         \"{user}:100000:65536\" to {file}"
    )]
    NoRange {
        user: String,
        id: u32,
        file: PathBuf,
    },
    #[error("failed to read {file}")]
    Read {
        file: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0} not found in $PATH (install the uidmap package, shadow-utils)")]
    HelperMissing(&'static str),
    #[error("{helper} {args} failed: {detail}")]
    Helper {
        helper: String,
        args: String,
        detail: String,
    },
    #[error("failed to write {file}")]
    Write {
        file: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A subordinate id range: `count` ids from `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubIdRange {
    pub start: u32,
    pub count: u32,
}

/// How the maps of a child will be written; planned before the child exists so that a
/// missing range fails before anything starts.
#[derive(Debug, Clone)]
pub enum IdMapPlan {
    /// Running as root: identity maps of the full id space.
    Root,
    /// An ordinary user: `newuidmap`/`newgidmap` with the user's ranges.
    Subordinate {
        uid: u32,
        gid: u32,
        uid_range: SubIdRange,
        gid_range: SubIdRange,
        newuidmap: PathBuf,
        newgidmap: PathBuf,
    },
}

impl IdMapPlan {
    /// Plans the maps for the calling process's effective ids.
    ///
    /// # Errors
    /// [`IdMapError::NoRange`] when an ordinary user has no subordinate ids,
    /// [`IdMapError::HelperMissing`] without `newuidmap`/`newgidmap`.
    pub fn for_current_user() -> Result<IdMapPlan, IdMapError> {
        let (uid, gid) = (Uid::effective(), Gid::effective());
        if uid.is_root() {
            return Ok(IdMapPlan::Root);
        }
        let name = User::from_uid(uid)
            .ok()
            .flatten()
            .map(|user| user.name)
            .unwrap_or_default();
        let lookup = |file: &str| {
            let text = fs::read_to_string(file).map_err(|source| IdMapError::Read {
                file: file.into(),
                source,
            });
            let found = text.map(|text| find_range(&text, &name, uid.as_raw()));
            found?.ok_or_else(|| IdMapError::NoRange {
                user: name.clone(),
                id: uid.as_raw(),
                file: file.into(),
            })
        };
        Ok(IdMapPlan::Subordinate {
            uid: uid.as_raw(),
            gid: gid.as_raw(),
            uid_range: lookup(SUBUID_FILE)?,
            gid_range: lookup(SUBGID_FILE)?,
            newuidmap: helper("newuidmap")?,
            newgidmap: helper("newgidmap")?,
        })
    }

    /// Writes the maps of process `pid`, which must have unshared its user namespace.
    ///
    /// # Errors
    /// The helper's failure (with its stderr) or the write failure.
    pub fn apply(&self, pid: Pid) -> Result<(), IdMapError> {
        match self {
            IdMapPlan::Root => {
                write_map(&proc_file(pid, "uid_map"))?;
                write_map(&proc_file(pid, "gid_map"))
            }
            IdMapPlan::Subordinate {
                uid,
                gid,
                uid_range,
                gid_range,
                newuidmap,
                newgidmap,
            } => {
                run_helper(newuidmap, pid, *uid, *uid_range)?;
                run_helper(newgidmap, pid, *gid, *gid_range)
            }
        }
    }
}

fn helper(name: &'static str) -> Result<PathBuf, IdMapError> {
    find_program(Path::new(name)).ok_or(IdMapError::HelperMissing(name))
}

fn proc_file(pid: Pid, name: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/{name}"))
}

fn write_map(file: &Path) -> Result<(), IdMapError> {
    fs::write(file, "0 0 4294967295\n").map_err(|source| IdMapError::Write {
        file: file.to_owned(),
        source,
    })
}

/// Runs `newuidmap PID 0 ID 1 1 START COUNT` (or `newgidmap`).
fn run_helper(helper: &Path, pid: Pid, id: u32, range: SubIdRange) -> Result<(), IdMapError> {
    let args = [
        pid.to_string(),
        "0".into(),
        id.to_string(),
        "1".into(),
        "1".into(),
        range.start.to_string(),
        range.count.to_string(),
    ];
    let failed = |detail: String| IdMapError::Helper {
        helper: helper.display().to_string(),
        args: args.join(" "),
        detail,
    };
    let output = Command::new(helper)
        .args(&args)
        .output()
        .map_err(|err| failed(err.to_string()))?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    Err(failed(format!("{}: {stderr}", output.status)))
}

/// Finds the first `NAME:START:COUNT` line of a subuid/subgid file naming `user` or `id`.
pub fn find_range(text: &str, user: &str, id: u32) -> Option<SubIdRange> {
    let id = id.to_string();
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(|line| {
            let mut fields = line.split(':');
            let owner = fields.next()?;
            let start = fields.next()?.trim().parse().ok()?;
            let count = fields.next()?.trim().parse().ok()?;
            let mine = (!user.is_empty() && owner == user) || owner == id;
            (mine && count > 0).then_some(SubIdRange { start, count })
        })
        .next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_range_by_name_or_id() {
        let text = "# comment\nalice:100000:65536\n1001:200000:1000\nbob:x:1\n";
        let range = |user, id| find_range(text, user, id);
        assert_eq!(
            range("alice", 1000),
            Some(SubIdRange {
                start: 100000,
                count: 65536
            })
        );
        assert_eq!(range("carol", 1001).map(|r| r.start), Some(200000));
        assert_eq!(range("bob", 1002), None);
        assert_eq!(range("", 1003), None);
    }

    #[test]
    fn no_range_message_is_actionable() {
        let err = IdMapError::NoRange {
            user: "rk".into(),
            id: 1000,
            file: SUBUID_FILE.into(),
        };
        assert_eq!(
            err.to_string(),
            "no subordinate ids for user \"rk\" (id 1000) in /etc/subuid; add a line like \
             \"rk:100000:65536\" to /etc/subuid"
        );
    }
}
