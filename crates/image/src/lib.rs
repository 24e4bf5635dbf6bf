//! vstream-image
