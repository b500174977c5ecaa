//! Where images come from and how they are decoded and checked.

pub mod allowed_urls;
pub mod block_fetch;
pub mod block_index;
pub mod decode;
pub mod digest;
pub mod http;
pub mod inspect;
pub mod manifest;
pub mod measure;
pub mod pack;
pub mod ranges;
pub mod signing;
pub mod source;
pub mod stream;
pub mod survey;
