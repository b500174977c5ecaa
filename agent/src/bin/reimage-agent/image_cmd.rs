//! `reimage-agent image pack|inspect`.

use anyhow::Context;
use clap::Subcommand;
use reimage_agent::image::http::HttpOptions;
use reimage_agent::image::inspect::{self, ImageInfo};
use reimage_agent::image::pack;
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
    },
    /// Decode an image (path or URL) and show its format, sizes, SHA-256 and
    /// partition table.
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
        ImageCommand::Pack { raw, output, level } => {
            let manifest = pack::pack(&raw, &output, level)
                .with_context(|| format!("packing {}", raw.display()))?;
            println!(
                "{}: {} bytes raw, sha256 {}; manifest {}",
                output.display(),
                manifest.size,
                manifest.sha256,
                pack::manifest_path(&output).display()
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
