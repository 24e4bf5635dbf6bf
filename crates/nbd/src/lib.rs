//! The NBD wire protocol, without sockets.
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
    decode_client_flags, decode_option, encode_greeting, ClientOption, OptionError,
};
pub use transmission::{decode_request, Command, Request, RequestError};
