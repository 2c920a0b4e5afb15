//! rkport none (placeholder until implemented).
