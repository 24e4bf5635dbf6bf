//! vstream-nbd
