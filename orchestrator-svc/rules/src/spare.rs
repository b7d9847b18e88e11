//! Spare float buffers of this thread for planes a pass overwrites entirely. The guided filter's solve makes and
//! drops ~10 grid-sized planes per region (its box filters' halves and results); as fresh allocations each was
//! zeroed first (a reused block is memset, a new one page-faults): ~3 % of a 1 MP photo (perf). A buffer given
//! back here is handed out again as is, old values included, so only code that writes every value may take one.
//! Bounded per thread (`MAX_BYTES`), so full-resolution planes (the general region path's) never stay here.

use std::cell::RefCell;

/// What one thread keeps at most: ~20 grid planes at 1 MP (s = 3), ~16 at 12 or 48 MP.
const MAX_BYTES: usize = 8 << 20;

thread_local! {
    static SPARE: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// `n` values of unspecified content (zeros or a returned buffer's old values): for a caller that writes all.
pub(crate) fn take(n: usize) -> Vec<f32> {
    let found = SPARE.with_borrow_mut(|spare| {
        let at = spare.iter().position(|v| v.len() == n)?;
        Some(spare.swap_remove(at))
    });
    found.unwrap_or_else(|| vec![0.0; n])
}

/// Keeps `v` for a later `take` of its length, if this thread's spares stay within `MAX_BYTES`; else frees it.
pub(crate) fn give_back(v: Vec<f32>) {
    let bytes = |v: &Vec<f32>| v.len() * size_of::<f32>();
    SPARE.with_borrow_mut(|spare| {
        if spare.iter().map(bytes).sum::<usize>() + bytes(&v) <= MAX_BYTES {
            spare.push(v);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_by_length_and_big_ones_are_not_kept() {
        let mut v = take(1000);
        v[7] = 3.0;
        let ptr = v.as_ptr();
        give_back(v);
        assert_eq!(take(999).len(), 999, "another length: a new buffer");
        let again = take(1000);
        assert_eq!(
            (again.as_ptr(), again[7]),
            (ptr, 3.0),
            "the same buffer, as it was"
        );
        let kept = || SPARE.with_borrow(|spare| spare.len());
        let before = kept();
        give_back(vec![0.0f32; MAX_BYTES / 4 + 1]);
        assert_eq!(kept(), before, "over the bound: freed");
        give_back(again);
        assert_eq!(kept(), before + 1);
    }
}
