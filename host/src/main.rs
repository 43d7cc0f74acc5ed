//! The `azgate` binary.

fn main() {}
