//! vstream-farm
