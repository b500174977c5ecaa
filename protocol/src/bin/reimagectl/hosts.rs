//! Which agents to talk to: `--agent URL`s, then the lines of `--hosts FILE`.

use crate::error::CliError;
use reimage_protocol::ErrorCode;
use reimage_protocol::client::parse_base_url;
use std::collections::HashMap;
use std::path::Path;

/// Every `--agent`, then every agent of the hosts file, checked and
/// normalised. An agent named twice is an error: a rollout must not
/// reimage a node twice.
pub fn agents(flags: &[String], hosts: Option<&Path>) -> Result<Vec<String>, CliError> {
    let mut named: Vec<(String, String)> = Vec::new();
    for flag in flags {
        let url = parse_base_url(flag)
            .map_err(|e| CliError::new(ErrorCode::InvalidArgument, format!("--agent: {e}")))?;
        named.push((url, format!("--agent {flag}")));
    }
    if let Some(path) = hosts {
        let text = std::fs::read_to_string(path).map_err(|e| {
            CliError::new(
                ErrorCode::InvalidHostsFile,
                format!("reading {}: {e}", path.display()),
            )
        })?;
        let parsed = parse_hosts(&text).map_err(|(line, why)| {
            CliError::new(
                ErrorCode::InvalidHostsFile,
                format!("{} line {line}: {why}", path.display()),
            )
        })?;
        for (line, url) in parsed {
            named.push((url, format!("{} line {line}", path.display())));
        }
    }
    let mut first_seen: HashMap<&str, &str> = HashMap::new();
    for (url, origin) in &named {
        if let Some(earlier) = first_seen.insert(url, origin) {
            return Err(CliError::new(
                ErrorCode::InvalidArgument,
                format!("{url} is named twice ({earlier} and {origin})"),
            ));
        }
    }
    Ok(named.into_iter().map(|(url, _)| url).collect())
}

/// The agents of a hosts file with their line numbers (1-based): one base
/// URL per line, `#` to the end of a line is a comment, blank lines are
/// skipped. A bad line is `(line, why)`.
pub fn parse_hosts(text: &str) -> Result<Vec<(usize, String)>, (usize, String)> {
    let mut agents = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        let content = line.split('#').next().unwrap_or_default().trim();
        if content.is_empty() {
            continue;
        }
        if content.split_whitespace().nth(1).is_some() {
            return Err((number, format!("one agent URL per line, found {content:?}")));
        }
        let url = parse_base_url(content).map_err(|e| (number, e.to_string()))?;
        agents.push((number, url));
    }
    Ok(agents)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_files_have_comments_blank_lines_and_numbered_errors() {
        let text = "# fleet A\n\nhttp://10.0.0.1:7480\n  https://n2.example:7480/  # rack 2\n";
        assert_eq!(
            parse_hosts(text),
            Ok(vec![
                (3, "http://10.0.0.1:7480".to_string()),
                (4, "https://n2.example:7480".to_string())
            ])
        );
        let (line, why) = parse_hosts("http://a:1\n\nnot-a-url\n").expect_err("bad line");
        assert_eq!(line, 3);
        assert!(why.contains("not-a-url"), "{why}");
        let (line, _) = parse_hosts("http://a:1 http://b:1\n").expect_err("two on a line");
        assert_eq!(line, 1);
        assert_eq!(parse_hosts("# nobody\n"), Ok(vec![]));
    }

    #[test]
    fn an_agent_named_twice_is_refused() {
        let err =
            agents(&["http://a:1".into(), "http://a:1/".into()], None).expect_err("duplicate");
        assert_eq!(err.code, "InvalidArgument");
        assert!(err.message.contains("named twice"), "{err}");
    }
}
