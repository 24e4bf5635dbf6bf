//! Feeds arbitrary bytes, in arbitrary pieces, to the import stream decoder.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vstream_api::extents::{Decoder, Event};

fuzz_target!(|data: &[u8]| {
    let mut dec = Decoder::new();
    for piece in data.chunks(7) {
        dec.feed(piece);
        loop {
            match dec.next_event() {
                Ok(Event::NeedMore) | Ok(Event::End) | Err(_) => break,
                Ok(Event::Header { .. }) | Ok(Event::Frame { .. }) => {}
            }
        }
    }
    let _ = dec.finish();
});
