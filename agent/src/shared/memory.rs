//! How `twilld` uses the C allocator (glibc's malloc), so its resident memory follows what it
//! holds rather than what it once held.
//!
//! Why:
//! - glibc gives each thread that allocates an arena of its own (up to eight per core), and
//!   memory freed in one arena is reused only by the threads bound to it. The agent's
//!   allocation-heavy phases run on different threads one after the other (the eBPF load, the
//!   etcd listing and the service state on the runtime's workers, the first dataplane apply and
//!   each `/metrics` render on blocking-pool threads), so with an arena each, every phase's peak
//!   stays resident next to the others. Its work is sequential, so one arena costs no
//!   measurable contention and lets each phase reuse what the previous one freed
//!   ([`tune`]; the `MALLOC_ARENA_MAX` environment variable, if set, still wins).
//! - glibc also raises its mmap threshold (up to 32 MiB) each time a large mapped block is
//!   freed; after that, large buffers (a listing page, a scrape's text) come from the arena and
//!   leave holes in it. A fixed threshold keeps every block above it in a mapping of its own,
//!   handed back to the kernel when freed.
//! - [`trim`] hands the free pages of the arena back after the big one-off phases (the first
//!   full service sync). That lowers the resident set, not its peak (`VmHWM`): the peak is
//!   lowered by holding fewer copies at once, which the service code sees to.
//!
//! Other C libraries (musl) keep their own defaults: both calls are no-ops there.

/// Blocks at least this large get a mapping of their own (glibc's initial default, made fixed).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 128 * 1024;

/// Sets the allocator up for the agent; call first in `main`, before any thread starts.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; called before other threads exist.
        unsafe {
            if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
                libc::mallopt(libc::M_ARENA_MAX, 1);
            }
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        }
    }
}

/// Returns the allocator's free pages to the kernel (after a large transient phase).
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim is thread-safe and only releases memory the allocator holds free.
    unsafe {
        libc::malloc_trim(0);
    }
}
