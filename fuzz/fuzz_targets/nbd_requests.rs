//! Feeds arbitrary bytes to the request decoder, the way the server does:
//! header, then payload, repeatedly.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vstream_nbd::{decode_request, REQUEST_HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some(req)) = decode_request(rest) {
        let need = REQUEST_HEADER_LEN.saturating_add(req.payload_len());
        if rest.len() < need {
            break;
        }
        rest = &rest[need..];
    }
});
