//! What a client sends on the API socket: JSON-lines requests or an HTTP request, parsed as the
//! API parses them (crates/ferry/src/request.rs, built here as it is).
#![no_main]
#[path = "../../crates/ferry/src/request.rs"]
mod request;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    request::fuzz_connection(data);
});
