//! Spare float buffers for planes a pass overwrites entirely. The guided filter's solve makes and drops ~10
//! grid-sized planes per region (its box filters' halves and results); as fresh allocations each was zeroed first
//! (a reused block is memset, a new one page-faults): ~3 % of a 1 MP photo (perf). A buffer given back here is
//! handed out again as is, old values included, so only code that writes every value may take one. One pool for
//! the process, bounded (`MAX_BYTES`): per thread, each of the blocking pool's many threads that ever built a
//! region kept its own, and the 1 MP bench job's peak resident set grew by 40-70 MB.

use std::sync::Mutex;

/// What the pool keeps at most: one region's solve gives back ~9 grid planes (3 MB at 1 MP, where s = 3; 4.5 MB
/// at 12 or 48 MP), so a few items in flight find theirs; full-resolution planes (the general region path's
/// filters) are larger than all of it and never stay.
const MAX_BYTES: usize = 16 << 20;

static SPARE: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

fn spare() -> std::sync::MutexGuard<'static, Vec<Vec<f32>>> {
    // A panic while holding the lock leaves a list of whole buffers: keep using it.
    SPARE.lock().unwrap_or_else(|e| e.into_inner())
}

/// `n` values of unspecified content (zeros or a returned buffer's old values): for a caller that writes all.
pub(crate) fn take(n: usize) -> Vec<f32> {
    let found = {
        let mut spare = spare();
        let at = spare.iter().position(|v| v.len() == n);
        at.map(|at| spare.swap_remove(at))
    };
    found.unwrap_or_else(|| vec![0.0; n])
}

/// Keeps `v` for a later `take` of its length if the pool stays within `MAX_BYTES`; else frees it.
pub(crate) fn give_back(v: Vec<f32>) {
    let bytes = |v: &Vec<f32>| v.len() * size_of::<f32>();
    let mut spare = spare();
    if spare.iter().map(bytes).sum::<usize>() + bytes(&v) <= MAX_BYTES {
        spare.push(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_by_length_and_big_ones_are_not_kept() {
        // Lengths no other test's planes have (the pool is the process's, shared with tests running beside).
        const N: usize = 7919;
        let mut v = take(N);
        v[7] = 3.0;
        let ptr = v.as_ptr();
        give_back(v);
        assert_eq!(take(N - 1).len(), N - 1, "another length: a new buffer");
        let again = take(N);
        assert_eq!(
            (again.as_ptr(), again[7]),
            (ptr, 3.0),
            "the same buffer, as it was"
        );
        let big = MAX_BYTES / 4 + 1;
        give_back(vec![0.0f32; big]);
        assert!(
            !spare().iter().any(|v| v.len() == big),
            "over the bound: freed"
        );
    }
}
