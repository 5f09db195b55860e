//! bpffs: whether a directory is on it, and mounting it where it is missing.

use std::path::Path;

use crate::Error;

/// The magic number of bpffs in `statfs.f_type`.
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Is `path` on a bpffs mount?
pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: an all-zero statfs is valid; statfs writes into it.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is NUL-terminated and stat is a valid out-pointer.
    unsafe { libc::statfs(c_path.as_ptr(), &mut stat) == 0 && stat.f_type as i64 == BPF_FS_MAGIC }
}

/// Makes sure bpffs is mounted at `path` (usually /sys/fs/bpf), mounting it
/// when it is not.
pub fn ensure_bpffs(path: &Path) -> Result<(), Error> {
    if is_bpffs(path) {
        return Ok(());
    }
    let bpffs_err = |why: String| Error::Bpffs {
        path: path.to_owned(),
        why,
    };
    std::fs::create_dir_all(path).map_err(|e| bpffs_err(format!("cannot create it: {e}")))?;
    let target = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| bpffs_err("path contains NUL".into()))?;
    // SAFETY: all strings are NUL-terminated; no data argument.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(bpffs_err(format!(
            "bpffs is not mounted and mounting it failed: {} (mount -t bpf bpf {})",
            std::io::Error::last_os_error(),
            path.display()
        )));
    }
    Ok(())
}
