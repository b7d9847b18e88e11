//! Bilinear upsampling a row at a time, for rows taken in increasing order: each row of the coarse grid is
//! interpolated across the output's columns once and kept while output rows fall between it and the next, so an
//! output pixel costs one vertical blend. Used by the instance-mask upsampler (`mask::RowWriter`) and the guided
//! filter (`guided::CoefficientRows`).

/// The two grid rows around the current output row, each as its horizontal interpolation at every output column.
pub(crate) struct GridRows<T> {
    top: (usize, Vec<T>),
    bot: (usize, Vec<T>),
}

impl<T: Copy + Default> GridRows<T> {
    /// For output rows `len` columns wide.
    pub(crate) fn new(len: usize) -> Self {
        GridRows {
            top: (usize::MAX, vec![T::default(); len]),
            bot: (usize::MAX, vec![T::default(); len]),
        }
    }

    /// Grid rows `j` (above) and `j1` (below), interpolating with `horizontal(row, out)` only those not held yet
    /// (moving on by one grid row reuses the lower as the upper).
    pub(crate) fn around(
        &mut self,
        j: usize,
        j1: usize,
        mut horizontal: impl FnMut(usize, &mut [T]),
    ) -> (&[T], &[T]) {
        if self.top.0 != j {
            if self.bot.0 == j {
                std::mem::swap(&mut self.top, &mut self.bot);
            } else {
                horizontal(j, &mut self.top.1);
                self.top.0 = j;
            }
        }
        if self.bot.0 != j1 {
            horizontal(j1, &mut self.bot.1);
            self.bot.0 = j1;
        }
        (&self.top.1, &self.bot.1)
    }
}

#[cfg(test)]
mod tests {
    use super::GridRows;

    #[test]
    fn each_grid_row_is_interpolated_once_while_rows_go_down() {
        let mut rows = GridRows::<f32>::new(2);
        let mut made = Vec::new();
        for (j, j1) in [(0, 1), (0, 1), (1, 2), (1, 2), (2, 2), (0, 1)] {
            let (top, bot) = rows.around(j, j1, |row, out| {
                made.push(row);
                out.fill(row as f32);
            });
            assert_eq!((top[0], bot[1]), (j as f32, j1 as f32));
        }
        // Moving down one grid row makes only the new lower row ((2, 2) at the last one makes 2 again below);
        // going back up makes both again.
        assert_eq!(made, vec![0, 1, 2, 2, 0, 1]);
    }
}
