//! vstream-server
