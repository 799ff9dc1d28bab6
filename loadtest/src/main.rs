//! The load-test harness (work in progress: the scenarios land with the load-test issue).
//!
//! It will drive `examples/basic_chat` and its peers over loopback with a lean client and report
//! deliveries/s, latency percentiles and server resources side by side.

fn main() {
    eprintln!("loadtest: no scenario is implemented yet; see PERF.md");
    std::process::exit(2);
}
