//! rkport launcher (placeholder until implemented).
