//! Placeholder: replaced by the ring benchmarks.
fn main() {}
