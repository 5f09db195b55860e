//! What /proc says about a process, for `conns` and `trace`.

/// The process's name (its main thread's), when it still runs: the kernel
/// reports the name of the thread that connected, such as a runtime's
/// worker thread.
pub fn process_name(pid: u32) -> Option<String> {
    let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(name.trim_end().to_owned())
}
