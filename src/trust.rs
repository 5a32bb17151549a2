//! Strict modes: kps-sync acts as root on what its inputs say, so every input that steers a
//! privileged action must be one that only root (or the user kps-sync runs as) can change.
//!
//! The inputs are the manifest (it names where keys go and what hooks run), the
//! `age_recipients_file`s (who can read a key), the `ca_file` (whom kps-sync believes is KPS),
//! `state_dir` (which files kps-sync calls its own, so may replace or prune) and the credential
//! files. Like sshd's `StrictModes` and like cron and sudo with a crontab or sudoers file, each
//! of them, and every folder above it, must be owned by root or by the user kps-sync runs as,
//! and must not be writable by group or other. The one exception: a root-owned folder with the
//! sticky bit (like `/tmp`) may sit above an input, since no one else can rename or replace
//! what is in it. A symlink on the way is judged too (its owner; it cannot be rewritten, only
//! replaced, which its folder's check covers), then followed.
//!
//! The decision ([`judge`]) is pure: facts about one path in, faults out. [`check`] does the
//! I/O: it walks the path from `/` by `lstat`, one component at a time, and judges each.
//! What does not exist yet is not judged (the writer creates missing folders 0700; a missing
//! file is reported by whoever reads it).
//!
//! Invariants: a path passes only when every existing component on the way to it, symlinks
//! followed, passes; a finding names the path, its owner and mode, and the command that fixes it.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fmt;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

/// Linux's own limit on symlinks in one lookup.
const MAX_SYMLINKS: usize = 40;

/// Which input a path is: it decides what the path itself must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    Manifest,
    RecipientsFile,
    CaFile,
    StateDir,
    /// A file holding a credential. Loose read bits are `validate`'s warnings, not faults here.
    Credential,
}

impl Input {
    fn what(self) -> &'static str {
        match self {
            Input::Manifest => "the manifest",
            Input::RecipientsFile => "age_recipients_file",
            Input::CaFile => "ca_file",
            Input::StateDir => "state_dir",
            Input::Credential => "a credential file",
        }
    }
}

/// What one path on the way is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Folder,
    File,
    Symlink,
    /// A socket, FIFO, device...
    Other,
}

/// The facts [`judge`] needs about one path, as `lstat` gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Facts {
    pub kind: Kind,
    pub uid: u32,
    /// Permission bits with setuid, setgid and sticky (`& 0o7777`).
    pub mode: u32,
}

/// Where a path sits in the chain leading to the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// A folder (or a symlink) on the way.
    Above,
    /// The input itself.
    Itself,
}

/// What is wrong with one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Owned by someone other than root or the user kps-sync runs as.
    Owner,
    GroupWritable,
    OtherWritable,
}

/// Judge one path. `me` is the effective uid kps-sync runs as. Only who can change the path
/// is judged, not what kind of file it is: whoever opens it says that better.
pub fn judge(place: Place, facts: Facts, me: u32) -> Vec<Fault> {
    let mut faults = Vec::new();
    if facts.uid != 0 && facts.uid != me {
        faults.push(Fault::Owner);
    }
    if facts.kind == Kind::Symlink {
        // Its mode means nothing; what it points to is judged next.
        return faults;
    }
    let sticky_root = place == Place::Above && facts.uid == 0 && facts.mode & 0o1000 != 0;
    if !sticky_root {
        if facts.mode & 0o020 != 0 {
            faults.push(Fault::GroupWritable);
        }
        if facts.mode & 0o002 != 0 {
            faults.push(Fault::OtherWritable);
        }
    }
    faults
}

/// One path that fails the check, with what is needed to say why and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub path: PathBuf,
    pub input: Input,
    pub place: Place,
    pub facts: Facts,
    pub faults: Vec<Fault>,
    /// The owner's user name, if it has one.
    pub owner_name: Option<String>,
    /// The user kps-sync runs as, for the `chown` advice.
    pub me_name: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path.display();
        let owner = match &self.owner_name {
            Some(name) => format!("{name} (uid {})", self.facts.uid),
            None => format!("uid {}", self.facts.uid),
        };
        let what = match (self.place, self.facts.kind) {
            (Place::Itself, _) => self.input.what().to_owned(),
            (Place::Above, Kind::Symlink) => {
                format!("a symlink on the way to {}", self.input.what())
            }
            (Place::Above, _) => format!("a folder above {}", self.input.what()),
        };
        let mut wrong = Vec::new();
        let mut fixes = Vec::new();
        for fault in &self.faults {
            match fault {
                Fault::Owner => {
                    wrong.push(format!("owned by {owner}"));
                    let h = if self.facts.kind == Kind::Symlink {
                        "-h "
                    } else {
                        ""
                    };
                    fixes.push(format!("chown {h}{} {path}", self.me_name));
                }
                Fault::GroupWritable => wrong.push("writable by its group".into()),
                Fault::OtherWritable => wrong.push("writable by every user".into()),
            }
        }
        if self
            .faults
            .iter()
            .any(|f| matches!(f, Fault::GroupWritable | Fault::OtherWritable))
        {
            fixes.push(format!("chmod go-w {path}"));
        }
        let trusted = if self.me_name == "root" {
            "root".to_owned()
        } else {
            format!("root or {}", self.me_name)
        };
        write!(
            f,
            "{path}: {what} is {} (owner {owner}, mode {:04o}); kps-sync acts as {} on what it \
             says, so only {trusted} may be able to change it",
            wrong.join(" and "),
            self.facts.mode,
            self.me_name,
        )?;
        if self.place == Place::Above {
            write!(
                f,
                ": run `{}`, or move {} to a folder that root controls",
                fixes.join(" && "),
                self.input.what()
            )
        } else {
            write!(f, ": run `{}`", fixes.join(" && "))
        }
    }
}

/// Every finding on the way to `path`, as one error; its `Display` has one line per finding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Untrusted {
    pub findings: Vec<Finding>,
}

impl fmt::Display for Untrusted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, finding) in self.findings.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{finding}")?;
        }
        Ok(())
    }
}

/// Check `path` (absolute) and every folder and symlink on the way to it, as kps-sync's
/// effective user. Components that do not exist end the walk without a finding.
pub fn check(path: &Path, input: Input) -> Result<(), Untrusted> {
    let me = nix::unistd::geteuid().as_raw();
    let findings: Vec<Finding> = chain(path)
        .into_iter()
        .filter_map(|(at, place, facts)| {
            let faults = judge(place, facts, me);
            (!faults.is_empty()).then(|| Finding {
                path: at,
                input,
                place,
                facts,
                faults,
                owner_name: user_name(facts.uid),
                me_name: user_name(me).unwrap_or_else(|| me.to_string()),
            })
        })
        .collect();
    if findings.is_empty() {
        Ok(())
    } else {
        Err(Untrusted { findings })
    }
}

fn user_name(uid: u32) -> Option<String> {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
}

/// Every existing path on the way to `path`, `/` first, symlinks followed, with its place and
/// facts. A path met twice (through symlinks) is listed once.
fn chain(path: &Path) -> Vec<(PathBuf, Place, Facts)> {
    let mut out: Vec<(PathBuf, Place, Facts)> = Vec::new();
    let push = |out: &mut Vec<(PathBuf, Place, Facts)>, at: PathBuf, place, facts| {
        if !out.iter().any(|(p, pl, _)| *p == at && *pl == place) {
            out.push((at, place, facts));
        }
    };
    let mut at = PathBuf::from("/");
    match facts_of(&at) {
        Ok(facts) => push(&mut out, at.clone(), Place::Above, facts),
        Err(_) => return out,
    }
    let mut todo: VecDeque<OsString> = names(path);
    let mut symlinks = 0;
    while let Some(name) = todo.pop_front() {
        if name == ".." {
            at.pop();
            continue;
        }
        let next = at.join(&name);
        let Ok(facts) = facts_of(&next) else {
            // Missing (or unreadable: whoever opens it next reports that).
            break;
        };
        if facts.kind == Kind::Symlink {
            push(&mut out, next.clone(), Place::Above, facts);
            symlinks += 1;
            let Ok(target) = std::fs::read_link(&next) else {
                break;
            };
            if symlinks > MAX_SYMLINKS {
                break;
            }
            if target.is_absolute() {
                at = PathBuf::from("/");
            }
            for part in names(&target).into_iter().rev() {
                todo.push_front(part);
            }
            continue;
        }
        let place = if todo.is_empty() {
            Place::Itself
        } else {
            Place::Above
        };
        push(&mut out, next.clone(), place, facts);
        at = next;
    }
    out
}

fn facts_of(path: &Path) -> io::Result<Facts> {
    let m = std::fs::symlink_metadata(path)?;
    let t = m.file_type();
    let kind = if t.is_symlink() {
        Kind::Symlink
    } else if t.is_dir() {
        Kind::Folder
    } else if t.is_file() {
        Kind::File
    } else {
        Kind::Other
    };
    Ok(Facts {
        kind,
        uid: m.uid(),
        mode: m.mode() & 0o7777,
    })
}

/// The components of `path` to walk: names and `..`; `/` and `.` dropped.
pub(crate) fn names(path: &Path) -> VecDeque<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(name.to_owned()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: u32 = 0;
    const BOB: u32 = 1000;

    fn facts(kind: Kind, uid: u32, mode: u32) -> Facts {
        Facts { kind, uid, mode }
    }

    #[test]
    fn root_owned_and_not_writable_by_others_passes() {
        for mode in [0o600, 0o644, 0o400, 0o640] {
            let f = facts(Kind::File, 0, mode);
            assert_eq!(judge(Place::Itself, f, ME), vec![], "{mode:o}");
        }
        let dir = facts(Kind::Folder, 0, 0o755);
        assert_eq!(judge(Place::Itself, dir, ME), vec![]);
        assert_eq!(judge(Place::Above, dir, ME), vec![]);
    }

    #[test]
    fn writable_by_group_or_other_is_a_fault() {
        let f = |mode| judge(Place::Itself, facts(Kind::File, 0, mode), ME);
        assert_eq!(f(0o664), vec![Fault::GroupWritable]);
        assert_eq!(f(0o646), vec![Fault::OtherWritable]);
        assert_eq!(f(0o666), vec![Fault::GroupWritable, Fault::OtherWritable]);
        let dir = |mode| judge(Place::Itself, facts(Kind::Folder, 0, mode), ME);
        assert_eq!(dir(0o775), vec![Fault::GroupWritable]);
        // The sticky exception is for folders above, not for an input itself (state_dir).
        assert_eq!(
            dir(0o1777),
            vec![Fault::GroupWritable, Fault::OtherWritable]
        );
    }

    #[test]
    fn a_root_owned_sticky_folder_may_sit_above_but_no_one_elses() {
        let tmp = facts(Kind::Folder, 0, 0o1777);
        assert_eq!(judge(Place::Above, tmp, ME), vec![]);
        let bobs = facts(Kind::Folder, BOB, 0o1777);
        assert_eq!(
            judge(Place::Above, bobs, ME),
            vec![Fault::Owner, Fault::GroupWritable, Fault::OtherWritable]
        );
        let not_sticky = facts(Kind::Folder, 0, 0o777);
        assert_eq!(
            judge(Place::Above, not_sticky, ME),
            vec![Fault::GroupWritable, Fault::OtherWritable]
        );
    }

    #[test]
    fn only_root_and_the_user_kps_sync_runs_as_are_trusted() {
        let bobs = facts(Kind::File, BOB, 0o600);
        assert_eq!(judge(Place::Itself, bobs, ME), vec![Fault::Owner]);
        assert_eq!(judge(Place::Itself, bobs, BOB), vec![]);
        let roots = facts(Kind::File, 0, 0o600);
        assert_eq!(judge(Place::Itself, roots, BOB), vec![]);
        let home = facts(Kind::Folder, BOB, 0o755);
        assert_eq!(judge(Place::Above, home, ME), vec![Fault::Owner]);
    }

    #[test]
    fn symlinks_are_judged_by_owner_only() {
        let link = facts(Kind::Symlink, 0, 0o777);
        assert_eq!(judge(Place::Above, link, ME), vec![]);
        let bobs_link = facts(Kind::Symlink, BOB, 0o777);
        assert_eq!(judge(Place::Above, bobs_link, ME), vec![Fault::Owner]);
    }

    #[test]
    fn a_finding_names_path_owner_mode_and_the_fix() {
        let finding = Finding {
            path: "/srv/m.yaml".into(),
            input: Input::Manifest,
            place: Place::Itself,
            facts: facts(Kind::File, BOB, 0o666),
            faults: vec![Fault::Owner, Fault::GroupWritable, Fault::OtherWritable],
            owner_name: Some("bob".into()),
            me_name: "root".into(),
        };
        let text = finding.to_string();
        assert!(
            text.starts_with("/srv/m.yaml: the manifest is owned by bob"),
            "{text}"
        );
        assert!(text.contains("mode 0666"), "{text}");
        assert!(text.contains("writable by every user"), "{text}");
        assert!(
            text.ends_with("run `chown root /srv/m.yaml && chmod go-w /srv/m.yaml`"),
            "{text}"
        );
        let above = Finding {
            path: "/home/bob".into(),
            place: Place::Above,
            facts: facts(Kind::Folder, BOB, 0o755),
            faults: vec![Fault::Owner],
            ..finding
        };
        let text = above.to_string();
        assert!(text.contains("a folder above the manifest"), "{text}");
        assert!(
            text.contains("or move the manifest to a folder that root controls"),
            "{text}"
        );
    }

    #[test]
    fn check_walks_every_folder_and_follows_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("etc");
        std::fs::create_dir(&dir).unwrap();
        let manifest = dir.join("m.yaml");
        std::fs::write(&manifest, "x").unwrap();
        let set = |p: &Path, mode| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        set(&manifest, 0o644);
        set(&dir, 0o755);
        check(&manifest, Input::Manifest).unwrap();
        // Missing parts are not judged.
        check(&dir.join("absent/deeper"), Input::StateDir).unwrap();

        set(&dir, 0o777);
        let err = check(&manifest, Input::Manifest).unwrap_err();
        assert_eq!(err.findings.len(), 1, "{err}");
        assert_eq!(err.findings[0].path, dir);
        assert_eq!(err.findings[0].place, Place::Above);
        set(&dir, 0o755);

        // Through a symlink, what it points to is judged.
        let link = tmp.path().join("link.yaml");
        std::os::unix::fs::symlink("etc/m.yaml", &link).unwrap();
        check(&link, Input::Manifest).unwrap();
        set(&manifest, 0o646);
        let err = check(&link, Input::Manifest).unwrap_err();
        assert_eq!(err.findings.len(), 1, "{err}");
        assert_eq!(err.findings[0].path, manifest);
        assert_eq!(err.findings[0].faults, vec![Fault::OtherWritable]);
        assert!(err.to_string().contains("chmod go-w"), "{err}");
    }
}
