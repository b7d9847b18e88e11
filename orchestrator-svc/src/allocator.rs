//! The orchestrator's memory allocator: jemalloc, which keeps freed pages for the next allocation.
//!
//! Why: a photo's full-frame buffers (the decoded photo, its working copy, instance and region planes: 36 MB each
//! at 12 MP, 2.3 MB at 1 MP) are all above glibc's mmap threshold (pinned at 128 KiB, see
//! `palette_service_kit::telemetry::fix_mmap_threshold`), so glibc maps every one afresh, the kernel faults it in and
//! zeroes it page by page, and it is unmapped when freed: ~15 % of a 12 MP photo's CPU went there (perf). jemalloc
//! keeps a freed buffer's pages and hands them to the next one. Measured with orchestrator-bench against glibc, same
//! session (docs/performance-log.md, "Allocator"): 21-29 % fewer CPU-seconds per 1 MP photo (mean, median),
//! 7-10 % per 12 MP one, outputs byte-identical.
//!
//! Settings, and what they cost: freed pages are returned to the system after about a second
//! (`dirty_decay_ms:1000`; jemalloc's default is 10 s) and at once rather than lazily (`muzzy_decay_ms:0`: lazily
//! freed pages would still count in the pod's resident set). The arena (one, below) keeps what was freed in the last
//! second, so the resident set sits above glibc's by about that (figures below), and the 48 MP memory check stays
//! within its pixel budget (~1.2 GB against 2.4 GB). A pod that
//! wants less can start with a shorter `dirty_decay_ms` (`_RJEM_MALLOC_CONF`, read after these).
//!
//! Requests above `oversize_threshold` (jemalloc's default: 8 MiB) go to a dedicated arena that returns freed pages
//! to the system at once, whatever `dirty_decay_ms` says: every 12 MP plane (12 MB) and photo (36 MB) came back as
//! fresh pages, faulted in one by one (a loop allocating and freeing 12 MB: 2931 faults, 7 ms, each round; 0 and
//! 0.8 ms with the threshold at 1 GiB, 2026-12-01). At 1 GiB only a buffer larger than any photo's (a 48 MP photo is
//! 144 MB) goes there. Zeroed requests (calloc) still come back fresh, as jemalloc zeroes reused pages by discarding
//! them: full-frame planes are zeroed by writing instead (`palette_rules::mask::zeroed_plane`).
//!
//! One arena for the whole process (`narenas:1`; jemalloc's default is 4 per core, each keeping its own freed
//! pages, and a thread keeps its arena whichever core it runs on): a buffer freed by one item's thread is found by
//! the next allocation on any thread, rather than stranded in another arena. Small allocations stay in each thread's
//! cache, so the shared arena is taken only for large ones and to refill those caches, not per pixel. It replaced one
//! arena per core (`percpu_arena:percpu`), which strands buffers the same way whenever a thread moves to another
//! core. orchestrator-bench, 2026-12-01, alternating runs of the same binary (`_RJEM_MALLOC_CONF`): minor faults of
//! a 12 MP run of 6 photos 195-217k -> 171-190k, the 1 MP job's peak resident set 153-166 -> 146-150 MB, the 48 MP
//! memory check 1326 -> 1151 MB (1.93 CPU-s per photo, 2.25 the session before); CPU per photo mostly within the
//! run-to-run noise (12 MP 1.57-1.78 photos per CPU-second either way, one pair 1.57 -> 1.74). Per-core arenas
//! also printed `Number of CPUs detected is not deterministic` under a CPU affinity mask and fell back to 4 arenas
//! per core there (1736 MB on that check); one arena does not depend on the CPU count at all.
//!
//! (`fix_mmap_threshold`'s note of jemalloc and mimalloc staying above 500 MB was measured with their default
//! settings, on the code of that time; with these the bench's 1 MP memory levels off as said above.)
//!
//! jemalloc is built from source by `tikv-jemalloc-sys` (a C compiler and make).

pub use tikv_jemallocator::Jemalloc;

/// jemalloc's options (read once, at the first allocation); see the module's documentation for why.
pub const MALLOC_CONF: &std::ffi::CStr =
    c"dirty_decay_ms:1000,muzzy_decay_ms:0,oversize_threshold:1073741824,narenas:1";

/// Makes jemalloc, with [`MALLOC_CONF`], the allocator of the binary that calls it at its root: the orchestrator's
/// main.rs, and the benches that run the orchestrator in-process, so that their figures are the service's.
#[macro_export]
macro_rules! use_jemalloc {
    () => {
        #[global_allocator]
        static ALLOCATOR: $crate::allocator::Jemalloc = $crate::allocator::Jemalloc;

        // The symbol jemalloc (built with its `_rjem_` prefix) reads its compiled-in options from.
        #[allow(unsafe_code)] // a static C string; nothing runs
        #[unsafe(export_name = "_rjem_malloc_conf")]
        static MALLOC_CONF: Option<&'static std::ffi::c_char> =
            // SAFETY: a pointer to the first byte of a 'static, NUL-terminated string.
            Some(unsafe { &*$crate::allocator::MALLOC_CONF.as_ptr() });
    };
}
