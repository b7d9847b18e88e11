//! Which decoder session runs a chunk of phrases: a static-shape one (DECODER_STATIC_BATCHES) when one holds the
//! chunk, padded up to its count, else the dynamic graph.
//!
//! A child module of `worker`, kept in its own file.

/// The smallest static-shape session (ascending by phrase count in `fixed`) that holds `n` phrases, with its
/// count; None: the dynamic graph runs them.
pub(super) fn smallest_holding<S>(fixed: &mut [(usize, S)], n: usize) -> Option<(usize, &mut S)> {
    fixed
        .iter_mut()
        .find(|(count, _)| *count >= n)
        .map(|(count, session)| (*count, session))
}

/// `rows` followed by copies of its last row up to `to` rows. A copy of a real phrase (not zeros) keeps the padded
/// rows' text mask valid: an all-masked row would softmax over nothing. The server drops their outputs.
pub(super) fn pad_rows<T: Clone>(rows: &[T], to: usize) -> Vec<T> {
    let mut padded = rows.to_vec();
    if let Some(last) = rows.last() {
        padded.resize(to.max(rows.len()), last.clone());
    }
    padded
}

#[cfg(test)]
mod tests {
    use super::{pad_rows, smallest_holding};

    #[test]
    fn the_smallest_fixed_count_that_holds_the_chunk_runs_it() {
        let mut fixed = [(2, "n2"), (4, "n4"), (8, "n8")];
        for (n, session) in [
            (1, Some("n2")),
            (2, Some("n2")),
            (3, Some("n4")),
            (8, Some("n8")),
            (9, None),
        ] {
            let chosen = smallest_holding(&mut fixed, n).map(|(_, s)| *s);
            assert_eq!(chosen, session, "{n} phrases");
        }
        assert_eq!(smallest_holding::<&str>(&mut [], 3), None);
    }

    #[test]
    fn rows_are_padded_with_the_last_one() {
        assert_eq!(pad_rows(&[1, 2, 3], 4), vec![1, 2, 3, 3]);
        assert_eq!(pad_rows(&[7], 1), vec![7]);
        assert_eq!(pad_rows(&[1, 2], 1), vec![1, 2], "never truncates");
        assert_eq!(pad_rows::<u8>(&[], 2), Vec::<u8>::new());
    }
}
