//! Feeds arbitrary bytes to the client's handshake decoders, the way the
//! agent meets a server: a greeting, then option replies. They must never
//! panic, whatever they consume must lie within the input, and reading a
//! reply as header then data must agree with reading it whole.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vstream_nbd::{
    decode_export_name_reply, decode_greeting, decode_option_reply, decode_option_reply_data,
    decode_option_reply_header,
};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    if let Ok(Some((_, used))) = decode_greeting(rest) {
        assert!(used <= rest.len());
        rest = &rest[used..];
    }
    for no_zeroes in [false, true] {
        if let Some((_, used)) = decode_export_name_reply(rest, no_zeroes) {
            assert!(used <= rest.len());
        }
    }
    while let Ok(Some((reply, used))) = decode_option_reply(rest) {
        assert!(used > 0 && used <= rest.len());
        let (header, n) = decode_option_reply_header(rest)
            .expect("a whole reply has a good header")
            .expect("a whole reply has a whole header");
        assert_eq!(n + header.length as usize, used);
        assert_eq!(
            decode_option_reply_data(&header, &rest[n..used]),
            reply.reply
        );
        assert_eq!(reply.reply.code(), header.reply);
        rest = &rest[used..];
    }
});
