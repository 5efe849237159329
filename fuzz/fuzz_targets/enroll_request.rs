//! The node-local enrollment protocol: one request line as an enroller (CNI plugin,
//! node watcher) writes it to the agent's Unix socket. Any line must be answered with
//! a request or an error, never a panic; an accepted `add` has every required field.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_common::enroll::{Request, check_fields, parse_request};

fuzz_target!(|data: &[u8]| {
    // The agent reads lines as UTF-8 and refuses anything else before parsing.
    let Ok(line) = std::str::from_utf8(data) else { return };
    if let Ok(Request::Add { pod }) = parse_request(line) {
        assert_eq!(check_fields(&pod), Ok(()), "accepted a pod with an empty field: {pod:?}");
        // What the agent keeps (and writes to its state dir) reads back the same.
        let again = format!(r#"{{"op":"add","pod":{}}}"#, serde_json::to_string(&pod).expect("a pod serializes"));
        assert_eq!(parse_request(&again), Ok(Request::Add { pod }));
    }
});
