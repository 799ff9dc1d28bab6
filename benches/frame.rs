//! Placeholder: the frame benches land with the load-test issue.
fn main() {}
