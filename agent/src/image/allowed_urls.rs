//! `[image] allowed_urls`: the only places images and manifests may come
//! from, checked for the first URL and for every redirect.

use crate::image::http::UrlPolicy;
use crate::image::source::Location;
use std::sync::Arc;
use url::Url;

/// URL prefixes; empty allows every location.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedUrls {
    prefixes: Vec<Url>,
}

impl AllowedUrls {
    /// Parses `prefixes`: each an `http://` or `https://` URL with a host
    /// and no query or fragment. The error names the prefix.
    pub fn parse(prefixes: &[String]) -> Result<AllowedUrls, String> {
        let mut parsed = Vec::with_capacity(prefixes.len());
        for prefix in prefixes {
            let url = Url::parse(prefix).map_err(|e| format!("{prefix:?} is not a URL: {e}"))?;
            if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
                return Err(format!(
                    "{prefix:?} must be an http:// or https:// URL with a host"
                ));
            }
            if url.query().is_some() || url.fragment().is_some() {
                return Err(format!("{prefix:?}: a prefix has no query or fragment"));
            }
            parsed.push(url);
        }
        Ok(AllowedUrls { prefixes: parsed })
    }

    /// True when no prefix is set: everything is allowed.
    pub fn is_empty(&self) -> bool {
        self.prefixes.is_empty()
    }

    /// True when the list is empty or `url` lies under one of the prefixes:
    /// same scheme, host and port, and a path under the prefix's path
    /// (whole segments: `/prod` allows `/prod/os.img`, not `/production`).
    /// Compared as parsed URLs, so `https://images.example.evil.com/` does
    /// not pass for `https://images.example`. Anything that is not a URL
    /// (a local path) never passes a non-empty list.
    pub fn allows(&self, url: &str) -> bool {
        if self.is_empty() {
            return true;
        }
        Url::parse(url).is_ok_and(|url| self.allows_url(&url))
    }

    /// [`AllowedUrls::allows`] for a location: a local file passes only an
    /// empty list.
    pub fn allows_location(&self, location: &Location) -> bool {
        match location {
            Location::Http(url) => self.is_empty() || self.allows_url(url),
            Location::File(_) => self.is_empty(),
        }
    }

    fn allows_url(&self, url: &Url) -> bool {
        self.prefixes.iter().any(|prefix| {
            url.scheme() == prefix.scheme()
                && url.host().is_some()
                && url.host() == prefix.host()
                && url.port_or_known_default() == prefix.port_or_known_default()
                && path_is_under(url.path(), prefix.path())
        })
    }

    /// The list as a policy for the HTTP client (first URL and every
    /// redirect); `None` when every URL is allowed.
    pub fn http_policy(&self) -> Option<UrlPolicy> {
        if self.is_empty() {
            return None;
        }
        let allowed = self.clone();
        Some(UrlPolicy(Arc::new(move |url: &Url| {
            allowed.allows_url(url)
        })))
    }
}

fn path_is_under(path: &str, prefix: &str) -> bool {
    if prefix.ends_with('/') {
        path.starts_with(prefix)
    } else {
        path == prefix
            || path
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with('/'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_compare_scheme_host_port_and_whole_path_segments() {
        let allowed = AllowedUrls::parse(&[
            "https://images.example".to_string(),
            "http://mirror.example:8080/fleet/os".to_string(),
        ])
        .expect("valid");
        for ok in [
            "https://images.example/os.img",
            "https://IMAGES.example/a/b.zst",
            "https://images.example:443/os.img",
            "http://mirror.example:8080/fleet/os/x.raw",
            "http://mirror.example:8080/fleet/os",
        ] {
            assert!(allowed.allows(ok), "{ok} must be allowed");
        }
        for refused in [
            "https://images.example.evil.com/os.img",
            "https://images.example@evil.com/os.img",
            "http://images.example/os.img",
            "https://images.example:8443/os.img",
            "http://mirror.example:8080/fleet/osx/x.raw",
            "http://mirror.example:8080/fleet/os/../../secret",
            "http://mirror.example/fleet/os/x.raw",
            "/srv/images/os.img",
            "not a url",
        ] {
            assert!(!allowed.allows(refused), "{refused} must be refused");
        }
        assert!(!allowed.allows_location(&Location::File("/srv/os.img".into())));
        let open = AllowedUrls::default();
        assert!(open.allows("/srv/images/os.img"), "no list allows all");
        assert!(open.allows_location(&Location::File("/srv/os.img".into())));
        assert!(open.http_policy().is_none());
    }

    #[test]
    fn prefixes_must_be_http_urls_with_a_host() {
        for bad in ["ftp://images.example/", "images.example", "https://x/?q=1"] {
            let err = AllowedUrls::parse(&[bad.to_string()]).expect_err(bad);
            assert!(err.contains(bad), "{err}");
        }
    }
}
