//! The controller -> agent config stream: newline-delimited JSON messages applied in
//! order to the agent's copy of its view, which is rebuilt into a typed config after
//! each one, as the agent does. A message or a view that does not apply is an error,
//! never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_common::control::{RawConfigMessage, RawObjects, materialize_raw};

fuzz_target!(|data: &[u8]| {
    let mut objects = RawObjects::new();
    for line in data.split(|b| *b == b'\n') {
        // The agent restarts the stream on a bad message; going on reaches more states.
        let Ok(message) = serde_json::from_slice::<RawConfigMessage>(line) else { continue };
        message.apply(&mut objects);
        let _ = materialize_raw(objects.iter().map(|(k, v)| (k, v.get())));
    }
});
