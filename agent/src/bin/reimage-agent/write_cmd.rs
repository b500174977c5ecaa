//! `reimage-agent write`: the reimage pipeline, once, from the command line.

use crate::display::ProgressOutput;
use anyhow::Context;
use clap::Args;
use reimage_agent::disk::saved::SaveSpec;
use reimage_agent::image::http::HttpOptions;
use reimage_agent::pipeline::{self, ImageRequest, WriteRequest};
use reimage_agent::reboot::{self, RebootMethod};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Args)]
pub struct WriteArgs {
    /// Image to write: an http(s) URL or a local path (raw, gzip, xz or zstd,
    /// detected from its first bytes). May be omitted with --manifest.
    #[arg(long, value_name = "URL|PATH")]
    image: Option<String>,
    /// Disk (block device) or regular file to write.
    #[arg(long, value_name = "DEVICE|FILE")]
    target: PathBuf,
    /// Expected SHA-256 of the decoded image (64 hex digits).
    #[arg(long, value_name = "HEX")]
    sha256: Option<String>,
    /// Image manifest (URL or path): gives the image's location, format,
    /// size and SHA-256.
    #[arg(long, value_name = "URL|PATH")]
    manifest: Option<String>,
    /// Accept only a manifest signed by this minisign public key (base64, or
    /// a .pub file); repeatable. With a key, --manifest is required.
    #[arg(long = "trusted-key", value_name = "KEY|FILE")]
    trusted_keys: Vec<String>,
    /// Keep the partitions whose label matches this glob (repeatable).
    #[arg(long = "save-partlabel", value_name = "GLOB")]
    save_partlabel: Vec<String>,
    /// Keep the partition with this 1-based index (repeatable).
    #[arg(long = "save-partindex", value_name = "N")]
    save_partindex: Vec<u32>,
    /// Reboot after a successful write.
    #[arg(long, value_enum, default_value_t = RebootMethod::None)]
    reboot: RebootMethod,
    /// Write one JSON object per line with the progress to this descriptor.
    #[arg(long, value_name = "FD")]
    progress_fd: Option<i32>,
    /// Skip reading everything back after the write (not recommended).
    #[arg(long)]
    no_verify_readback: bool,
    /// Consecutive failed HTTP attempts before giving up.
    #[arg(long, default_value_t = 10, value_name = "N")]
    retries: u32,
    /// Seconds without a byte from the server before reconnecting.
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    stall_timeout: u64,
    /// Give up on a server slower than this many bytes/s over
    /// --min-rate-window (0: never).
    #[arg(long, default_value_t = 1024, value_name = "BYTES")]
    min_rate: u64,
    /// Seconds over which --min-rate is measured.
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    min_rate_window: u64,
}

pub fn run(args: WriteArgs) -> anyhow::Result<()> {
    if args.reboot == RebootMethod::Kexec {
        return Err(reimage_agent::Error::InvalidArgument(
            "--reboot kexec is the daemon's (it loads the kernel the image's manifest names); use systemd or syscall here".into(),
        )
        .into());
    }
    let http = HttpOptions {
        retries: args.retries,
        stall_timeout: Duration::from_secs(args.stall_timeout),
        min_rate: args.min_rate,
        min_rate_window: Duration::from_secs(args.min_rate_window),
        ..HttpOptions::default()
    };
    let trusted_keys = args
        .trusted_keys
        .iter()
        .map(|key| read_key(key))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let image = ImageRequest::resolve(
        args.image.as_deref(),
        args.manifest.as_deref(),
        args.sha256.as_deref(),
        &http,
        &trusted_keys,
    )
    .context("resolving the image")?;
    let request = WriteRequest {
        image,
        target: args.target.clone(),
        save: SaveSpec {
            labels: args.save_partlabel,
            indexes: args.save_partindex,
        },
        read_back: !args.no_verify_readback,
        http,
        beside_mounts: Vec::new(),
    };
    let mut progress = ProgressOutput::new(args.progress_fd)?;
    let result = pipeline::write_image(&request, &mut |p| progress.show(p));
    progress.clear();
    let report = result
        .map_err(|failure| failure.error)
        .with_context(|| format!("writing {}", args.target.display()))?;
    tracing::info!(
        size = report.size,
        sha256 = %report.sha256,
        format = %report.format,
        zeroed = report.zeroed_bytes,
        saved = report.saved.len(),
        seconds = report.elapsed.as_secs_f64(),
        "image written, verified and read back"
    );
    println!(
        "wrote {} bytes ({}, sha256 {}) to {} in {:.1}s; kept {} saved partition(s)",
        report.size,
        report.format,
        report.sha256,
        args.target.display(),
        report.elapsed.as_secs_f64(),
        report.saved.len()
    );
    if let Some(blocks) = report.blocks {
        println!(
            "through the block index: fetched {} bytes, wrote {} bytes, kept {} bytes the disk already held",
            blocks.downloaded, blocks.written, blocks.unchanged
        );
    }
    reboot::reboot(args.reboot, false).context("rebooting")?;
    Ok(())
}

/// A key given inline, or the text of the `.pub` file it names.
pub fn read_key(key: &str) -> anyhow::Result<String> {
    let path = std::path::Path::new(key);
    if path.is_file() {
        std::fs::read_to_string(path).with_context(|| format!("reading the trusted key {key}"))
    } else {
        Ok(key.to_string())
    }
}
