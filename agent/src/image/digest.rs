//! SHA-256 digests as the agent reads them from configs, manifests, the
//! command line and API requests: 64 hex digits, either case. One parser
//! for all of them, so a value one place accepts no other place refuses.

/// Why text is not a SHA-256. The text itself is never echoed: a token
/// pasted where its hash belongs must not end up in a log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Sha256SyntaxError {
    #[error("expected a SHA-256 as 64 hex digits, got {0} characters")]
    Length(usize),
    #[error("expected a SHA-256 as 64 hex digits, found a non-hex character")]
    NotHex,
}

/// The 32 bytes of a SHA-256 written as 64 hex digits (no spaces).
pub fn parse_sha256(text: &str) -> Result<[u8; 32], Sha256SyntaxError> {
    if text.len() != 64 {
        return Err(Sha256SyntaxError::Length(text.chars().count()));
    }
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(text, &mut bytes).map_err(|_| Sha256SyntaxError::NotHex)?;
    Ok(bytes)
}

/// The same digest in the agent's spelling: lowercase hex.
pub fn parse_sha256_hex(text: &str) -> Result<String, Sha256SyntaxError> {
    parse_sha256(text).map(hex::encode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn either_case_parses_to_lowercase_and_nothing_else_does() {
        let upper = "AB".repeat(32);
        assert_eq!(parse_sha256_hex(&upper), Ok("ab".repeat(32)));
        assert_eq!(parse_sha256(&upper).map(|b| b[0]), Ok(0xab));
        assert_eq!(parse_sha256_hex("abc"), Err(Sha256SyntaxError::Length(3)));
        assert_eq!(
            parse_sha256_hex(&format!(" {}", &upper[1..])),
            Err(Sha256SyntaxError::NotHex),
            "no trimming: the caller trims what it read from a file"
        );
        let secret = format!("{}zz", "a".repeat(62));
        let message = parse_sha256(&secret).expect_err("not hex").to_string();
        assert!(!message.contains(&secret), "{message}");
    }
}
