//! rkport socat (placeholder until implemented).
