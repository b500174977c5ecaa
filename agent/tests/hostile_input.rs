//! Hostile input on the stable toolchain: arbitrary bytes and mutations of
//! valid documents into every parser the agent exposes. None may panic or
//! hang; each returns a value or a typed error.

use proptest::prelude::*;
use reimage_agent::config::Config;
use reimage_agent::disk::saved::{SaveSpec, SavedPartitions};
use reimage_agent::image::decode::open_decoder;
use reimage_agent::image::manifest;
use reimage_protocol::api::{AddTaskRequest, ReimageRequest};
use std::io::{Cursor, Read};

const MANIFEST: &str = r#"{"name":"os","url":"os.img.zst","format":"zstd","size":4096,"sha256":"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"}"#;

const CONFIG: &str = r#"[agent]
node_id = "n1"
state_dir = "/var/lib/reimage-agent"
[api]
listen = "127.0.0.1:7480"
[disk]
target = "/dev/vda"
save_partlabel = ["local-storage"]
[tasks]
default_retention = "P7D"
kill_grace = "PT30S"
[reboot]
method = "none"
"#;

/// A valid document with a few bytes replaced, removed or inserted.
fn mutated(base: &'static str) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec((0usize..base.len(), any::<u8>(), 0u8..3), 1..8).prop_map(
        move |edits| {
            let mut bytes = base.as_bytes().to_vec();
            for (at, byte, kind) in edits {
                let at = at.min(bytes.len().saturating_sub(1));
                match kind {
                    0 => bytes[at] = byte,
                    1 if !bytes.is_empty() => {
                        bytes.remove(at);
                    }
                    _ => bytes.insert(at, byte),
                }
            }
            bytes
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn manifests_never_panic(bytes in prop_oneof![mutated(MANIFEST), proptest::collection::vec(any::<u8>(), 0..512)]) {
        if let Ok(parsed) = manifest::parse(&bytes) {
            prop_assert_eq!(parsed.sha256.len(), 64);
        }
    }

    #[test]
    fn configs_never_panic(bytes in mutated(CONFIG)) {
        let text = String::from_utf8_lossy(&bytes);
        if let Err(err) = Config::parse(&text, "fuzz.toml") {
            prop_assert_eq!(err.code(), "ConfigInvalid");
        }
    }

    #[test]
    fn api_bodies_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = serde_json::from_slice::<ReimageRequest>(&bytes);
        let _ = serde_json::from_slice::<AddTaskRequest>(&bytes);
    }

    #[test]
    fn partition_tables_never_panic(head in proptest::collection::vec(any::<u8>(), 0..40_000), flip in any::<(u16, u8)>()) {
        // A valid GPT with one byte flipped, and pure noise.
        let mut disk = valid_gpt_disk();
        let at = 512 + (flip.0 as usize % (33 * 512));
        disk[at] ^= flip.1.max(1);
        let spec = SaveSpec { labels: vec!["local-storage".into()], indexes: vec![] };
        let _ = SavedPartitions::find(&mut Cursor::new(&disk), 512, &spec);
        let _ = SavedPartitions::find(&mut Cursor::new(&head), 512, &spec);
        if let Ok(saved) = SavedPartitions::find(&mut Cursor::new(valid_gpt_disk()), 512, &spec) {
            let _ = saved.merge_with_image(&head, 8 << 20);
        }
    }

    #[test]
    fn decoders_never_panic_on_noise_behind_a_magic(kind in 0usize..4, body in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let magic: &[u8] = [&[0x1f, 0x8b][..], b"\xfd7zXZ\x00", &[0x28, 0xb5, 0x2f, 0xfd], b""][kind];
        let mut input = magic.to_vec();
        input.extend_from_slice(&body);
        if let Ok((_, mut reader)) = open_decoder(Cursor::new(input)) {
            // Bounded: at most 64 MiB out of 4 KiB in, then stop.
            let mut sink = Vec::new();
            let _ = reader.by_ref().take(64 << 20).read_to_end(&mut sink);
        }
    }
}

/// An 8 MiB disk with a GPT holding `local-storage`.
fn valid_gpt_disk() -> Vec<u8> {
    let size = 8u64 << 20;
    let mut sparse = reimage_agent::disk::gpt::SparseDisk::new(size, 512);
    let mut table = gptman::GPT::new_from(&mut sparse, 512, [1; 16]).expect("table");
    table[1] = gptman::GPTPartitionEntry {
        partition_type_guid: [2; 16],
        unique_partition_guid: [3; 16],
        starting_lba: 2048,
        ending_lba: 8191,
        attribute_bits: 0,
        partition_name: "local-storage".into(),
    };
    let mut disk = vec![0u8; size as usize];
    reimage_agent::disk::gpt::render(&mut table, size, None)
        .expect("render")
        .apply_to(&mut disk);
    disk
}
