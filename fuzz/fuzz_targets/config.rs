#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../daemon/tests/fuzz/targets.rs"]
mod targets;

fuzz_target!(|data: &[u8]| {
    let _ = targets::config(data);
});
