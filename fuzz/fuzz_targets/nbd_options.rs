//! Feeds arbitrary bytes to the handshake decoders: they must never panic,
//! and whatever they consume must lie within the input.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vstream_nbd::{decode_client_flags, decode_option};

fuzz_target!(|data: &[u8]| {
    if data.len() >= 4 {
        let _ = decode_client_flags([data[0], data[1], data[2], data[3]]);
    }
    let mut rest = data;
    while let Ok(Some((_, used))) = decode_option(rest) {
        assert!(used > 0 && used <= rest.len());
        rest = &rest[used..];
    }
});
