//! Request ids in UUID form (version 4, random), as Batch uses them for
//! `client-request-id` and `request-id`.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

/// A fresh random id such as `1b4e28ba-2fa1-41d2-883f-0016d3cca427`.
pub fn new_request_id() -> String {
    let mut bytes = [0u8; 16];
    // Without the kernel's randomness, fall back to the clock: an id must
    // exist, and it only has to be unique among one node's requests.
    if getrandom::fill(&mut bytes).is_err() {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        bytes = nanos.to_le_bytes();
    }
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let mut text = String::with_capacity(36);
    for (i, byte) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            text.push('-');
        }
        let _ = write!(text, "{byte:02x}");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_random_version_4_uuids() {
        let id = new_request_id();
        let groups: Vec<usize> = id.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12], "{id}");
        assert_eq!(&id[14..15], "4", "version 4: {id}");
        assert!(
            matches!(&id[19..20], "8" | "9" | "a" | "b"),
            "variant: {id}"
        );
        assert_ne!(id, new_request_id());
    }
}
