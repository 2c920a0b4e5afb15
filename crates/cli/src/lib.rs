//! CLI

pub mod kit;

pub mod ctl;
