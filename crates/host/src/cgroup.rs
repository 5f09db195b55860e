//! cgroup v2 helpers: find the hierarchy, make a tree of cgroups that is
//! removed again, name a cgroup by its id, and start processes inside a
//! cgroup.

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::Error;

/// Where cgroup v2 is mounted on hosts that mount it beside cgroup v1.
pub const CGROUP2_HYBRID_ROOT: &str = "/sys/fs/cgroup/unified";

/// Where cgroup v2 is mounted, read from /proc/self/mountinfo.
pub fn cgroup2_root() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        left.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// The cgroup id the kernel reports for a cgroup v2 directory (its inode).
pub fn cgroup_id(path: &Path) -> Result<u64, Error> {
    std::fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|e| Error::Cgroup {
            path: path.to_owned(),
            why: format!("{e} (give an existing cgroup v2 directory)"),
        })
}

/// A tree of cgroups made by this process under the cgroup v2 root. On drop,
/// the processes still inside (all started by us or our children) are ended
/// and the cgroups removed, deepest first.
pub struct CgroupTree {
    root: PathBuf,
    made: Mutex<Vec<PathBuf>>,
}

impl CgroupTree {
    /// Creates `<cgroup v2 root>/<name>`; the name must not exist yet.
    pub fn create(name: &str) -> Result<CgroupTree, Error> {
        let base = cgroup2_root().ok_or_else(|| Error::Cgroup {
            path: PathBuf::from("/sys/fs/cgroup"),
            why: "cgroup v2 is not mounted (mount -t cgroup2 none /sys/fs/cgroup)".into(),
        })?;
        CgroupTree::create_in(&base, name)
    }

    /// Creates `<parent>/<name>` inside an existing cgroup v2 directory.
    pub fn create_in(parent: &Path, name: &str) -> Result<CgroupTree, Error> {
        if !parent.join("cgroup.procs").exists() {
            return Err(Error::Cgroup {
                path: parent.to_owned(),
                why: "not a cgroup v2 directory".into(),
            });
        }
        let root = parent.join(name);
        std::fs::create_dir(&root).map_err(|e| Error::Cgroup {
            path: root.clone(),
            why: format!("cannot create it: {e}"),
        })?;
        Ok(CgroupTree {
            made: Mutex::new(vec![root.clone()]),
            root,
        })
    }

    /// The tree's top cgroup.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates (if needed) and returns a cgroup below the root, e.g. "apps/curl".
    pub fn cgroup(&self, relative: &str) -> Result<PathBuf, Error> {
        let mut path = self.root.clone();
        for part in relative.split('/') {
            path.push(part);
            if !path.exists() {
                std::fs::create_dir(&path).map_err(|e| Error::Cgroup {
                    path: path.clone(),
                    why: format!("cannot create it: {e}"),
                })?;
                self.made.lock().unwrap().push(path.clone());
            }
        }
        Ok(path)
    }
}

impl Drop for CgroupTree {
    fn drop(&mut self) {
        let made = std::mem::take(&mut *self.made.lock().unwrap());
        for path in &made {
            let procs = std::fs::read_to_string(path.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        for path in made.iter().rev() {
            // An ended process takes a moment to leave its cgroup.
            let deadline = Instant::now() + Duration::from_secs(5);
            while std::fs::remove_dir(path).is_err() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Makes `command` start inside `cgroup` (and, with `uid`, as that user and
/// group): the child joins the cgroup before exec, while still privileged,
/// so every socket it opens, and its children's, belong to that cgroup.
pub fn run_in_cgroup(command: &mut Command, cgroup: &Path, uid: Option<u32>) -> Result<(), Error> {
    let procs = std::ffi::CString::new(cgroup.join("cgroup.procs").as_os_str().as_encoded_bytes())
        .map_err(|_| Error::Cgroup {
            path: cgroup.to_owned(),
            why: "path contains a NUL byte".into(),
        })?;
    // SAFETY: between fork and exec the closure only makes plain system
    // calls on data prepared before the fork.
    unsafe {
        command.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if written != 1 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(uid) = uid {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(uid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok(())
}
