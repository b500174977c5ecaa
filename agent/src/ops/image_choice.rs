//! Which image a reimage writes: the one its request names, or the
//! configured default; and whether the agent may fetch it at all.

use super::refusal::Refusal;
use crate::config::Config;
use crate::image::digest;
use crate::image::http::HttpOptions;
use crate::image::source::Location;
use crate::pipeline::ImageRequest;
use crate::reboot::kexec::KexecRequest;
use reimage_protocol::ErrorCode;
use reimage_protocol::api::ImageSpec;

/// Where the choice came from: a request's image is held to the API's
/// rules (URLs only, local files only where allowed); the configured one
/// is the operator's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Request,
    Config,
}

/// What to write.
#[derive(Debug, Clone)]
pub struct ImageChoice {
    pub what: ImageSource,
    pub origin: Origin,
}

/// An image by URL and hash, or by manifest.
#[derive(Debug, Clone)]
pub enum ImageSource {
    Inline {
        url: String,
        sha256: String,
        size: Option<u64>,
    },
    Manifest(String),
}

/// The image a request (a reimage's or a prefetch's image fields) asks
/// for, or the configured one; refused when the request is contradictory,
/// names nothing and nothing is configured, or names a location the
/// configuration does not allow.
pub fn choose(
    config: &Config,
    image: Option<&ImageSpec>,
    manifest_url: Option<&str>,
) -> Result<ImageChoice, Refusal> {
    let choice = match (image, manifest_url) {
        (Some(_), Some(_)) => {
            return Err(Refusal::invalid(
                ErrorCode::InvalidRequestBody,
                "give either image or manifestUrl, not both",
            ));
        }
        (Some(image), None) => {
            let sha256 = digest::parse_sha256_hex(&image.sha256).map_err(|e| {
                Refusal::invalid(ErrorCode::InvalidRequestBody, format!("image.sha256: {e}"))
            })?;
            ImageChoice {
                what: ImageSource::Inline {
                    url: image.url.clone(),
                    sha256,
                    size: image.size,
                },
                origin: Origin::Request,
            }
        }
        (None, Some(manifest)) => ImageChoice {
            what: ImageSource::Manifest(manifest.to_string()),
            origin: Origin::Request,
        },
        (None, None) => configured(config).ok_or_else(|| {
            Refusal::invalid(
                ErrorCode::MissingImage,
                "the request names no image and no [image] is configured",
            )
        })?,
    };
    if !config.image.trusted_keys.is_empty() && matches!(choice.what, ImageSource::Inline { .. }) {
        return Err(Refusal::invalid(
            ErrorCode::ManifestUnsigned,
            "[image] trusted_keys is set: give a signed manifest (manifestUrl), not an image URL and hash",
        ));
    }
    let url = choice.url();
    let location = match choice.origin {
        Origin::Request => Location::parse_url(url, config.image.allow_local_files),
        Origin::Config => Location::parse(url),
    }
    .map_err(|e| {
        Refusal::invalid(ErrorCode::InvalidImageUrl, e.to_string()).with_detail("url", url)
    })?;
    if !config.image.allowed_urls.allows_location(&location) {
        return Err(Refusal::invalid(
            ErrorCode::ImageUrlNotAllowed,
            format!("{url} does not match [image] allowed_urls"),
        )
        .with_detail("url", url));
    }
    Ok(choice)
}

fn configured(config: &Config) -> Option<ImageChoice> {
    let image = &config.image;
    let what = if let Some(manifest) = &image.manifest_url {
        ImageSource::Manifest(manifest.clone())
    } else {
        match (&image.url, &image.sha256) {
            (Some(url), Some(sha256)) => ImageSource::Inline {
                url: url.clone(),
                sha256: sha256.clone(),
                size: None,
            },
            _ => return None,
        }
    };
    Some(ImageChoice {
        what,
        origin: Origin::Config,
    })
}

impl ImageChoice {
    /// The image's URL, or its manifest's.
    pub fn url(&self) -> &str {
        match &self.what {
            ImageSource::Inline { url, .. } | ImageSource::Manifest(url) => url,
        }
    }

    /// A short name for the image: the last path segment of its URL.
    pub fn name(&self) -> String {
        let url = self.url();
        let last = url.rsplit('/').next().unwrap_or(url);
        last.trim_end_matches(".manifest.json").to_string()
    }

    /// Reads the manifest (if any) and says what the write must produce.
    /// The image a request's manifest names is held to the same rules as
    /// the request's own URLs: a manifest from a server may not point the
    /// agent at a file on the node.
    pub fn resolve(&self, config: &Config, http: &HttpOptions) -> crate::Result<ImageRequest> {
        let trusted_keys = &config.image.trusted_keys;
        let request = match &self.what {
            ImageSource::Inline { url, sha256, size } => {
                let mut request =
                    ImageRequest::resolve(Some(url), None, Some(sha256), http, trusted_keys)?;
                request.size = *size;
                request
            }
            ImageSource::Manifest(manifest) => {
                ImageRequest::resolve(None, Some(manifest), None, http, trusted_keys)?
            }
        };
        self.check_named(config, &request.location)?;
        Ok(request)
    }

    /// What a kexec into this image boots: its manifest's `boot.kexec`,
    /// each file held to the rules of the image's own URL. `Ok(None)` for
    /// an image without a manifest, or whose manifest names no kernel.
    pub fn kexec(
        &self,
        config: &Config,
        http: &HttpOptions,
    ) -> crate::Result<Option<KexecRequest>> {
        let ImageSource::Manifest(manifest) = &self.what else {
            return Ok(None);
        };
        let location = Location::parse(manifest)?;
        let (manifest, _) =
            crate::image::manifest::load(&location, http, &config.image.trusted_keys)?;
        let Some(kexec) = manifest.boot.and_then(|boot| boot.kexec) else {
            return Ok(None);
        };
        let request = KexecRequest::from_manifest(&kexec, &location)?;
        for file in request.files() {
            self.check_named(config, &file.location)?;
        }
        Ok(Some(request))
    }

    /// A location a manifest names is held to the rules of the request's
    /// own URLs: a manifest from a server may not point the agent at a
    /// file on the node, and `allowed_urls` applies.
    fn check_named(&self, config: &Config, location: &Location) -> crate::Result<()> {
        if let Location::File(path) = location {
            let local_allowed = self.origin == Origin::Config || config.image.allow_local_files;
            if !local_allowed {
                return Err(crate::Error::ImageUrlNotAllowed(format!(
                    "the manifest names the local file {}; the API takes local files only with [image] allow_local_files",
                    path.display()
                )));
            }
        }
        if !config.image.allowed_urls.allows_location(location) {
            return Err(crate::Error::ImageUrlNotAllowed(format!(
                "{location} (from the manifest) does not match [image] allowed_urls"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reimage_protocol::api::ReimageRequest;

    fn choose(config: &Config, request: &ReimageRequest) -> Result<ImageChoice, Refusal> {
        super::choose(
            config,
            request.image.as_ref(),
            request.manifest_url.as_deref(),
        )
    }

    fn config(extra: &str) -> Config {
        let text = format!(
            "[disk]\ntarget = \"/dev/disk/by-id/x\"\nsave_partlabel = [\"local-storage\"]\n[reboot]\nmethod = \"none\"\n{extra}"
        );
        Config::parse(&text, "test").expect("config")
    }

    fn inline(url: &str) -> ReimageRequest {
        ReimageRequest {
            image: Some(ImageSpec {
                url: url.into(),
                sha256: "AB".repeat(32),
                size: None,
            }),
            ..ReimageRequest::default()
        }
    }

    #[test]
    fn a_request_may_name_only_urls_and_local_files_only_where_allowed() {
        let closed = config("");
        for refused in [
            "/etc/hostname",
            "os.img",
            "file:///etc/hostname",
            "ftp://x/os.img",
        ] {
            let refusal = choose(&closed, &inline(refused)).expect_err(refused);
            assert_eq!(
                refusal.code,
                ErrorCode::InvalidImageUrl,
                "{refused}: {refusal}"
            );
        }
        let choice = choose(&closed, &inline("https://images.example/os.img")).expect("url");
        assert_eq!(choice.origin, Origin::Request);
        let open = config("[image]\nallow_local_files = true\n");
        choose(&open, &inline("file:///srv/os.img")).expect("file URL where allowed");
        let refusal = choose(&open, &inline("/srv/os.img")).expect_err("bare path");
        assert_eq!(refusal.code, ErrorCode::InvalidImageUrl);
    }

    #[test]
    fn the_configured_image_may_be_a_local_path() {
        let sha = "ab".repeat(32);
        let config = config(&format!(
            "[image]\nurl = \"/srv/os.img\"\nsha256 = \"{sha}\"\n"
        ));
        let choice = choose(&config, &ReimageRequest::default()).expect("configured");
        assert_eq!(choice.origin, Origin::Config);
        assert_eq!(choice.url(), "/srv/os.img");
    }

    #[test]
    fn a_request_without_an_image_and_no_default_is_missing_image() {
        let refusal = choose(&config(""), &ReimageRequest::default()).expect_err("none");
        assert_eq!(refusal.code, ErrorCode::MissingImage);
    }
}
