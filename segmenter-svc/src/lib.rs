//! Segmenter.
