//! Criterion micro-benchmarks of the filter's hot path (`benches/filter_hot_path.rs`); this
//! library is empty: the crate exists so the benchmarks' dependencies stay out of the filter's.
