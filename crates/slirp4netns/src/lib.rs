//! rkport slirp4netns (placeholder until implemented).
