//! Memory tuning for `basic_chat`: optional, and nothing the chat logic depends on.
//!
//! The example runs on mimalloc, set up so that an idle server's resident memory stays close to
//! what its connections use (the figures are in `docs/guides/tuning.md`, "Memory per
//! connection"). An application can copy this module as it is, or leave it out and keep the
//! system allocator: the runtime works the same either way.
//!
//! [`tune`] runs before the tokio runtime starts; [`collect_when_idle`] is its `on_thread_park`
//! hook.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Sets the process up for mimalloc as described in the functions below. Call it once, first
/// thing in `main`.
pub(crate) fn tune() {
    no_transparent_huge_pages();
    return_freed_memory_promptly();
}

/// Lets mimalloc return freed pages to the OS as soon as they are free, unless
/// `MIMALLOC_PURGE_DELAY` says otherwise.
///
/// By default mimalloc keeps a freed page for a second before returning it, and only does so
/// when the thread that owns it allocates again. After a burst of handshakes (each one holds
/// hyper's buffers until its upgrade) an idle server's threads allocate nothing, so that memory
/// stayed resident: 4.3 to 4.7 KiB of RSS per idle connection at 10 000 instead of 3.8. Purging
/// at once cost nothing measurable in the project's fan-out and connect load tests (PERF.md).
fn return_freed_memory_promptly() {
    // `mi_option_purge_delay` in mimalloc.h (v2 and v3); libmimalloc-sys names no constant for it.
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one integer option; mimalloc reads options atomically.
        #[allow(unsafe_code)]
        unsafe {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0)
        };
    }
}

/// Turns transparent huge pages off for this process (Linux), unless `MIMALLOC_ALLOW_THP` says
/// otherwise.
///
/// mimalloc asks the kernel for huge pages for its arena (`MADV_HUGEPAGE`). A huge page is 2 MiB
/// resident however little of it is in use, and the kernel's khugepaged keeps merging the arena's
/// sparsely used regions into huge pages in the background: an idle `basic_chat` held 8 to
/// 10 MiB of anonymous memory instead of 1, and its RSS moved in 2 MiB steps with no client
/// connected (docs/performance-notes.md#transparent-huge-pages). Fan-out throughput did not
/// change measurably without them.
fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // SAFETY: PR_SET_THP_DISABLE takes plain integers and changes one flag of this process;
        // it cannot affect memory safety. A kernel without it returns an error, ignored here.
        #[allow(unsafe_code)]
        unsafe {
            libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0)
        };
    }
}

/// Runs on a worker thread each time it runs out of work: lets mimalloc take back what other
/// threads freed of this thread's allocations, at most once a second per thread.
///
/// A connection's task is allocated on one worker and often freed on another; mimalloc hands
/// such a block back to its own thread's pages only when that thread next allocates or
/// collects, and only then can the page be returned to the OS. A worker that parks after a peak
/// may not allocate again for a long time. Without this, three rounds of 2 000 connections left
/// 4.6 to 9.4 MiB more resident than before them once everyone had gone; with it, at most
/// 1.4 MiB (docs/performance-notes.md#giving-peak-memory-back). A collection walks the thread's
/// whole heap, so its cost grows with the connections: at most every 10 ms, it added 3.7 µs of
/// CPU per delivery with 10 000 subscribers and doubled p99
/// (docs/performance-notes.md#idle-collection-cost).
pub(crate) fn collect_when_idle() {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(1);
    thread_local! {
        static LAST: std::cell::Cell<Option<std::time::Instant>> =
            const { std::cell::Cell::new(None) };
    }
    LAST.with(|last| {
        if last.get().is_none_or(|at| at.elapsed() >= EVERY) {
            last.set(Some(std::time::Instant::now()));
            // SAFETY: `mi_collect` only gives back what this thread's heap no longer uses.
            #[allow(unsafe_code)]
            unsafe {
                libmimalloc_sys::mi_collect(false)
            };
        }
    });
}
