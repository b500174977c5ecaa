//! `reimage-agent image pack|inspect`.

use anyhow::Context;
use clap::Subcommand;
use reimage_agent::image::http::HttpOptions;
use reimage_agent::image::inspect::{self, ImageInfo};
use reimage_agent::image::pack;
use reimage_agent::image::signing;
use reimage_agent::image::source::Location;
use std::path::PathBuf;

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Compress a raw image and write OUT.manifest.json beside it.
    Pack {
        /// The raw disk image.
        raw: PathBuf,
        /// Output; its extension picks the format (.zst, .gz, .xz).
        #[arg(short, long)]
        output: PathBuf,
        /// Compression level.
        #[arg(long, default_value_t = 3)]
        level: i32,
        /// Write one zstd frame per 4 MiB of raw image and OUT.index.json
        /// (named in the manifest with its SHA-256), so that a node already
        /// holding a similar image fetches and writes only what differs.
        #[arg(long)]
        block_index: bool,
    },
    /// Make a minisign key pair for signing manifests: NAME.pub and NAME.key
    /// (mode 0600; encrypted when REIMAGE_SIGNING_PASSWORD is set).
    Keygen {
        #[arg(short, long, value_name = "NAME")]
        output: PathBuf,
    },
    /// Sign a manifest: writes MANIFEST.minisig (an encrypted key takes its
    /// password from REIMAGE_SIGNING_PASSWORD, or asks on the terminal).
    Sign {
        manifest: PathBuf,
        #[arg(long, value_name = "FILE")]
        secret_key: PathBuf,
    },
    /// Check a manifest's MANIFEST.minisig against trusted public keys, as
    /// the agent does with [image] trusted_keys.
    Verify {
        #[arg(value_name = "MANIFEST")]
        manifest: String,
        /// A public key (base64) or a .pub file; repeatable.
        #[arg(long = "trusted-key", value_name = "KEY|FILE", required = true)]
        trusted_keys: Vec<String>,
    },
    /// Decode an image (path or URL) and show its format, sizes, SHA-256 and
    /// partition table; given a manifest (*.json), the image it names,
    /// checked against it and its block index.
    Inspect {
        #[arg(value_name = "FILE|URL")]
        image: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(command: ImageCommand) -> anyhow::Result<()> {
    match command {
        ImageCommand::Pack {
            raw,
            output,
            level,
            block_index,
        } => {
            let options = pack::PackOptions { level, block_index };
            let manifest = pack::pack(&raw, &output, options)
                .with_context(|| format!("packing {}", raw.display()))?;
            println!(
                "{}: {} bytes raw, sha256 {}; manifest {}",
                output.display(),
                manifest.size,
                manifest.sha256,
                pack::manifest_path(&output).display()
            );
            if manifest.block_index.is_some() {
                println!("block index: {}", pack::index_path(&output).display());
            }
            Ok(())
        }
        ImageCommand::Keygen { output } => {
            let public = signing::keygen(&output, password())
                .with_context(|| format!("making the key pair {}", output.display()))?;
            println!("public key (for [image] trusted_keys): {public}");
            Ok(())
        }
        ImageCommand::Sign {
            manifest,
            secret_key,
        } => {
            let signature = signing::sign(&manifest, &secret_key, password())
                .with_context(|| format!("signing {}", manifest.display()))?;
            println!("{}", signature.display());
            Ok(())
        }
        ImageCommand::Verify {
            manifest,
            trusted_keys,
        } => {
            let keys = trusted_keys
                .iter()
                .map(|key| crate::write_cmd::read_key(key))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let location = Location::parse(&manifest)?;
            let (loaded, image) =
                reimage_agent::image::manifest::load(&location, &HttpOptions::default(), &keys)
                    .with_context(|| format!("verifying {manifest}"))?;
            println!(
                "{manifest}: signature ok; image {image} ({}, {} bytes, sha256 {})",
                loaded.format, loaded.size, loaded.sha256
            );
            Ok(())
        }
        ImageCommand::Inspect { image, json } => {
            let location = Location::parse(&image)?;
            let info = inspect::inspect(&location, &HttpOptions::default())
                .with_context(|| format!("inspecting {image}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                print!("{}", describe(&info));
            }
            Ok(())
        }
    }
}

/// The signing key's password, when given in the environment.
fn password() -> Option<String> {
    std::env::var("REIMAGE_SIGNING_PASSWORD").ok()
}

fn describe(info: &ImageInfo) -> String {
    let mut text = format!(
        "image:   {}\nformat:  {}\nencoded: {}\nsize:    {} bytes\nsha256:  {}\n",
        info.location,
        info.format,
        info.encoded_size
            .map_or_else(|| "unknown".to_string(), |n| format!("{n} bytes")),
        info.size,
        info.sha256
    );
    if let Some(matches) = info.manifest_matches {
        text.push_str(if matches {
            "manifest: matches (format, size and sha256)\n"
        } else {
            "manifest: DOES NOT MATCH the image\n"
        });
    }
    if let Some(index) = &info.block_index {
        text.push_str(&format!(
            "block index: {}\n  {} blocks of {} bytes, {} all zeros, frames over {} bytes; {}\n",
            index.location,
            index.blocks,
            index.block_size,
            index.zero_blocks,
            index.encoded_size,
            if index.mismatched_blocks.is_empty() {
                "every block matches the image".to_string()
            } else {
                format!(
                    "blocks {:?} DO NOT MATCH the image",
                    index.mismatched_blocks
                )
            }
        ));
    }
    match &info.partition_table {
        None => text.push_str("partition table: none (no GPT)\n"),
        Some(table) => {
            text.push_str(&format!(
                "partition table: GPT, {}-byte sectors, disk {}\n",
                table.sector_size, table.disk_guid
            ));
            text.push_str(&format!(
                "  {:>3} {:>12} {:>12} {:>14}  {:<36}  {}\n",
                "#", "first", "last", "bytes", "guid", "label"
            ));
            for p in &table.partitions {
                text.push_str(&format!(
                    "  {:>3} {:>12} {:>12} {:>14}  {:<36}  {}\n",
                    p.index, p.first_lba, p.last_lba, p.size_bytes, p.guid, p.label
                ));
            }
        }
    }
    text
}
