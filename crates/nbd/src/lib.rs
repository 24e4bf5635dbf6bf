//! The NBD wire protocol, without sockets.
//!
//! Both ends of the wire use it: the server (`crates/service`) decodes
//! options and requests and encodes replies; the agent's client
//! (`crates/target/src/upstream.rs`) does the reverse.
//!
//! Decoders take a byte slice and answer `Ok(None)` when they need more bytes,
//! `Ok(Some((value, consumed)))` when a whole message is there, and an error when
//! the bytes can never form a valid message. Encoders append to a `Vec<u8>` so
//! that a reply header and its payload leave in one write.
//!
//! ```text
//!   server                                  client
//!   greeting (NBDMAGIC IHAVEOPT flags) ---->
//!                                     <---- client flags
//!                                     <---- option            \
//!   option reply(s)                   ---->                    } until GO / EXPORT_NAME
//!   ............ transmission: requests and replies, possibly out of order ............
//! ```

pub mod consts;
pub mod handshake;
pub mod transmission;

pub use consts::*;
pub use handshake::{
    decode_client_flags, decode_export_name_reply, decode_greeting, decode_option,
    decode_option_reply, decode_option_reply_data, decode_option_reply_header, encode_client_flags,
    encode_greeting, encode_option, ClientOption, Greeting, HandshakeError, Info, OptionError,
    OptionReply, OptionReplyHeader, ServerReply,
};
pub use transmission::{
    decode_chunk_error, decode_chunk_header, decode_reply_header, decode_request,
    decode_simple_reply, encode_request, ChunkHeader, Command, ReplyError, ReplyHeader, Request,
    RequestError, SimpleReply,
};
