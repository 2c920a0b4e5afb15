//! rkport api (placeholder until implemented).
