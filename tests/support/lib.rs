//! Shared helpers for the end-to-end tests: the real binaries, test disks
//! and images, loop devices, and a fault-injecting HTTP server.

pub mod bin;
pub mod ctl;
pub mod daemon;
pub mod faulty_disk;
pub mod http_server;
pub mod images;
pub mod loopdev;
pub mod pki;
