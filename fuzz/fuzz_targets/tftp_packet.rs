//! Parses arbitrary bytes as a TFTP packet. Whatever parses must encode and parse
//! back to the same packet; a request's file name and options also go through the
//! server's path confinement and option negotiation, which must never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::Component;
use vstream_netboot::tftp::{parse, relative_path, Negotiated, Packet, MAX_BLKSIZE, MIN_BLKSIZE};

fuzz_target!(|data: &[u8]| {
    let Ok(packet) = parse(data) else {
        return;
    };
    let mut encoded = Vec::new();
    packet.encode(&mut encoded);
    assert_eq!(
        parse(&encoded).as_ref(),
        Ok(&packet),
        "round trip of {data:?}"
    );

    if let Packet::Rrq(request) | Packet::Wrq(request) = &packet {
        if let Ok(path) = relative_path(request.filename) {
            assert!(path.components().all(|c| matches!(c, Component::Normal(_))));
        }
        let negotiated = Negotiated::from_options(&request.options);
        if let Some(blksize) = negotiated.blksize {
            assert!((MIN_BLKSIZE..=MAX_BLKSIZE).contains(&blksize));
        }
        assert!(negotiated.timeout != Some(0));
    }
});
