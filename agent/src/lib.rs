//! reimage-agent: streams, verifies and writes an OS image to a disk while
//! keeping its local-storage partitions, and (in the daemon) drives that
//! under the node's task policies.
//!
//! The pipeline reads as its diagram, see [`pipeline::write_image`]:
//! `source → decode → hash → sink → verify`.

pub mod api;
pub mod boot;
pub mod config;
pub mod daemon;
pub mod disk;
pub mod duration;
pub mod error;
pub mod handoff;
pub mod image;
pub mod metrics;
pub mod ops;
pub mod pattern;
pub mod pipeline;
pub mod prefetch;
pub mod progress;
pub mod reboot;
pub mod sandbox;
pub mod service;
pub mod store;
pub mod system;
pub mod tasks;

pub use error::{Error, Result};
