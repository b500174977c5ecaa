//! Where images come from and how they are decoded and checked.

pub mod decode;
pub mod http;
