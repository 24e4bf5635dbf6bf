//! The disk I/O priority of background readers: replication, the scrub,
//! the boot sets' read-ahead.

/// While held, this thread's disk I/O has the lowest best-effort priority:
/// device streaming comes first. (Not the idle class: that starves a copy
/// for as long as anything else touches the disk, even a sync of its own.)
/// Restores the previous priority on drop.
pub struct LowIo(Option<i64>);

const IOPRIO_WHO_PROCESS: i64 = 1;
const IOPRIO_CLASS_BE: i64 = 2;
const IOPRIO_CLASS_SHIFT: i64 = 13;
const IOPRIO_LOWEST: i64 = 7;

impl LowIo {
    pub fn enter() -> LowIo {
        // SAFETY: plain syscalls on the calling thread (who 0), no memory involved.
        let prev = unsafe { libc::syscall(libc::SYS_ioprio_get, IOPRIO_WHO_PROCESS, 0) };
        let idle = (IOPRIO_CLASS_BE << IOPRIO_CLASS_SHIFT) | IOPRIO_LOWEST;
        // SAFETY: as above.
        let set = unsafe { libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0, idle) };
        LowIo((prev >= 0 && set == 0).then_some(prev))
    }
}

impl Drop for LowIo {
    fn drop(&mut self) {
        if let Some(prev) = self.0 {
            // SAFETY: as in `enter`.
            unsafe { libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0, prev) };
        }
    }
}
