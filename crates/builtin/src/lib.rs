//! rkport builtin (placeholder until implemented).
