//! ITEM_THREADS=one: an item's CPU work on its blocking thread alone.

/// Runs `work` with a rayon pool of the current thread alone: its `par_iter`s run sequentially right here.
pub fn single_thread<T: Send>(work: impl FnOnce() -> T + Send) -> T {
    thread_local! {
        static POOL: Option<rayon::ThreadPool> = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .use_current_thread()
            .thread_name(|_| "item-cpu".into())
            .build()
            .ok();
    }
    POOL.with(|pool| match pool {
        Some(pool) => pool.install(work),
        // Could not build (not expected): the shared pool still computes the same.
        None => work(),
    })
}
