//! The boot-storm benchmark's pieces (bench/storm): the NBD wire subset that the floor
//! server and the replaying clients speak, and the boot trace format.
//!
//! Only the standard library, and none of vstream's own NBD code: the clients must not
//! share a bug with the server they measure, and the floor must be the least work a
//! server can do per request.

pub mod nbd;
pub mod trace;
