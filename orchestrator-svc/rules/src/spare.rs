//! Spare float buffers for planes a pass overwrites entirely. The guided filter's solve makes and drops ~10
//! grid-sized planes per region (its box filters' halves and results); as fresh allocations each was zeroed first
//! (a reused block is memset, a new one page-faults): ~3 % of a 1 MP photo (perf). A buffer given back here is
//! handed out again as is, old values included, so only code that writes every value may take one. One pool for
//! the process, bounded (`MAX_BYTES`): per thread, each of the blocking pool's many threads that ever built a
//! region kept its own, and the 1 MP bench job's peak resident set grew by 30-100 MB.

use std::sync::Mutex;

/// What the pool keeps at most: one region's solve gives back ~9 grid planes (3 MB at 1 MP, where s = 3; 4.5 MB
/// at 12 or 48 MP), so a few items in flight find theirs; full-resolution planes (the general region path's
/// filters) are larger than all of it and never stay.
const MAX_BYTES: usize = 16 << 20;

/// A list of spare buffers, bounded by `MAX_BYTES` (its own type so that tests can have one of their own).
struct Pool(Mutex<Vec<Vec<f32>>>);

static SPARE: Pool = Pool(Mutex::new(Vec::new()));

fn bytes(v: &Vec<f32>) -> usize {
    v.capacity() * size_of::<f32>()
}

/// `n` values of unspecified content (zeros, or a returned buffer's old values): for a caller that writes all.
pub(crate) fn take(n: usize) -> Vec<f32> {
    SPARE.take(n)
}

/// Keeps `v` for a later `take` (see `Pool::give_back`).
pub(crate) fn give_back(v: Vec<f32>) {
    SPARE.give_back(v);
}

impl Pool {
    fn list(&self) -> std::sync::MutexGuard<'_, Vec<Vec<f32>>> {
        // A panic while holding the lock leaves a list of whole buffers: keep using it.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The smallest spare that holds n (grid sizes differ with each region's crop), else a new buffer.
    fn take(&self, n: usize) -> Vec<f32> {
        let found = {
            let mut spare = self.list();
            let best = (spare.iter().enumerate())
                .filter(|(_, v)| v.capacity() >= n)
                .min_by_key(|(_, v)| v.capacity())
                .map(|(at, _)| at);
            best.map(|at| spare.swap_remove(at))
        };
        match found {
            Some(mut v) => {
                // Zeros only where a shorter buffer grows within its capacity.
                v.truncate(n);
                v.resize(n, 0.0);
                v
            }
            None => vec![0.0; n],
        }
    }

    /// Keeps `v`, making room by freeing the longest-kept spares (the newest are the sizes of the photos being
    /// worked on); a buffer larger than the whole bound is freed instead.
    fn give_back(&self, v: Vec<f32>) {
        if bytes(&v) > MAX_BYTES {
            return;
        }
        let mut spare = self.list();
        while spare.iter().map(bytes).sum::<usize>() + bytes(&v) > MAX_BYTES {
            spare.remove(0);
        }
        spare.push(v);
    }

    #[cfg(test)]
    fn kept_bytes(&self) -> usize {
        self.list().iter().map(bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_best_fit_and_the_pool_stays_bounded() {
        let pool = Pool(Mutex::new(Vec::new()));
        const N: usize = 1000;
        let mut v = pool.take(N);
        v[7] = 3.0;
        let ptr = v.as_ptr();
        pool.give_back(v);
        pool.give_back(vec![0.0f32; 4 * N]);
        let shorter = pool.take(N - 9);
        assert_eq!(
            (shorter.len(), shorter.as_ptr(), shorter[7]),
            (N - 9, ptr, 3.0),
            "the smallest that holds it, cut"
        );
        pool.give_back(shorter);
        let again = pool.take(N);
        assert_eq!(
            (again.len(), again.as_ptr(), again[7]),
            (N, ptr, 3.0),
            "the same buffer, grown back"
        );
        pool.give_back(vec![0.0f32; MAX_BYTES / 4 + 1]);
        assert_eq!(pool.kept_bytes(), 16 * N, "over the bound: freed");
        // Filling the pool pushes the oldest spares out, never past the bound.
        for _ in 0..40 {
            pool.give_back(vec![0.0f32; MAX_BYTES / 16]);
        }
        assert_eq!(pool.kept_bytes(), MAX_BYTES);
        assert_eq!(pool.take(4 * N).len(), 4 * N);
        drop(again);
    }
}
