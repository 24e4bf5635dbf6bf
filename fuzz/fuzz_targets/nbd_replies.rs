//! Feeds arbitrary bytes to the client's transmission decoders, the way a
//! client reads a server: a reply header, then a chunk's payload, repeatedly.
//! They must never panic and whatever they consume must lie within the input.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vstream_nbd::{
    decode_chunk_error, decode_chunk_header, decode_reply_header, decode_simple_reply, ReplyHeader,
};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((header, used))) = decode_reply_header(rest) {
        assert!(used > 0 && used <= rest.len());
        let payload = match header {
            ReplyHeader::Simple(reply) => {
                assert_eq!(decode_simple_reply(rest), Ok(Some((reply, used))));
                0
            }
            ReplyHeader::Chunk(chunk) => {
                assert_eq!(decode_chunk_header(rest), Ok(Some((chunk, used))));
                chunk.length as usize
            }
        };
        let end = used.saturating_add(payload);
        if rest.len() < end {
            break;
        }
        if let ReplyHeader::Chunk(chunk) = header {
            if chunk.is_error() {
                let _ = decode_chunk_error(&rest[used..end]);
            }
        }
        rest = &rest[end..];
    }
});
