//! `reimage-agent demo`: a whole local cycle in a temporary sandbox,
//! narrated. A daemon and an image server run in this process on
//! 127.0.0.1; the target is a sparse file; nothing else is touched.

use anyhow::{Context, Result, bail};
use reimage_agent::daemon::Daemon;
use reimage_protocol::api::{Operation, OperationStatus, Task};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Duration;

const MIB: u64 = 1 << 20;
/// Short retention, so the retaineddata reimage waits seconds, not days.
const RETENTION: &str = "PT5S";

pub fn run() -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(demo())
}

async fn demo() -> Result<()> {
    let dir = tempfile_dir()?;
    say(&format!("sandbox in {}", dir.display()));
    let mut config = reimage_agent::sandbox::sandbox(&dir).context("preparing the sandbox")?;
    config.api.listen = "127.0.0.1:0".parse()?;
    config.tasks.kill_grace = Duration::from_secs(2);
    let token = std::fs::read_to_string(dir.join(reimage_agent::sandbox::TOKEN_FILE))?
        .trim()
        .to_string();

    let storage = fill_local_storage(&config.disk.target)?;
    say(&format!(
        "the target {} keeps `local-storage`; its SHA-256 is {}",
        config.disk.target.display(),
        &storage.sha[..16]
    ));

    // The sandbox's own test image, served over HTTP so that the reimages
    // download it as a fleet node would.
    let packed_at = dir.join(reimage_agent::sandbox::IMAGE_FILE);
    let manifest_at = reimage_agent::image::pack::manifest_path(&packed_at);
    let manifest = reimage_agent::image::manifest::parse(&std::fs::read(&manifest_at)?)?;
    let image_sha = manifest.sha256;
    let image_url = serve_image(std::fs::read(&packed_at)?).await?;
    say(&format!(
        "a {} MiB GPT image (efi + root), zstd, served at {image_url}",
        manifest.size / MIB
    ));

    let daemon = Daemon::start(config.clone()).await?;
    let api = format!("http://{}", daemon.address);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(daemon.run_until(async {
        let _ = stopped.await;
    }));
    say(&format!(
        "the agent serves its API on {api} (admin token in {}/admin.token)",
        dir.display()
    ));
    let client = Client::new(api, token);

    for option in ["requeue", "terminate", "taskcompletion", "retaineddata"] {
        println!();
        say(&format!("— reimage with nodeReimageOption \"{option}\" —"));
        match option {
            "requeue" | "terminate" => {
                client
                    .add_task(&format!("{option}-long"), "sleep 600", Some(RETENTION))
                    .await?;
                client
                    .wait_task_state(&format!("{option}-long"), "running")
                    .await?;
                say(&format!("task {option}-long is running (sleep 600)"));
            }
            "taskcompletion" => {
                client
                    .add_task("finishing", "sleep 3; echo finished", Some(RETENTION))
                    .await?;
                client.wait_task_state("finishing", "running").await?;
                say("task finishing is running; it ends by itself in 3 s");
            }
            _ => {
                client
                    .add_task("with-data", "echo results > out.txt", Some(RETENTION))
                    .await?;
                client.wait_task_state("with-data", "completed").await?;
                say("task with-data completed; every task's files are retained for 5 s");
            }
        }
        let op = client.reimage(option, &image_url, &image_sha).await?;
        say(&format!("operation {} accepted", op.id));
        let done = client.follow(&op.id).await?;
        if done.status != OperationStatus::Succeeded {
            bail!("the {option} reimage failed: {:?}", done.error);
        }
        if !done.requeued_tasks.is_empty() {
            say(&format!(
                "requeued (will run again): {:?}",
                done.requeued_tasks
            ));
        }
        if !done.terminated_tasks.is_empty() {
            say(&format!("terminated: {:?}", done.terminated_tasks));
        }
        let now = fill_local_storage_sha(&config.disk.target, &storage)?;
        say(&format!(
            "succeeded; local-storage SHA-256 {} ({})",
            &now[..16],
            if now == storage.sha {
                "unchanged"
            } else {
                "CHANGED"
            }
        ));
        if now != storage.sha {
            bail!("local-storage changed");
        }
    }
    let _ = stop.send(());
    server.await??;
    println!();
    say("done: four reimages, every task handled by its policy, local-storage intact");
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(())
}

fn say(text: &str) {
    println!("demo: {text}");
}

fn tempfile_dir() -> Result<std::path::PathBuf> {
    let base = std::env::temp_dir().join(format!("reimage-demo-{}", std::process::id()));
    std::fs::create_dir_all(&base)?;
    Ok(base)
}

/// Where local-storage lies and what it holds.
struct Storage {
    start: u64,
    len: u64,
    sha: String,
}

/// Writes 8 MiB of random data at the start of local-storage (as a node's
/// saved data) and hashes the partition's first 64 MiB.
fn fill_local_storage(target: &Path) -> Result<Storage> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(target)?;
    let table = gptman::GPT::read_from(&mut file, 512).context("reading the sandbox disk's GPT")?;
    let (_, entry) = table
        .iter()
        .find(|(_, e)| e.is_used() && e.partition_name.as_str() == "local-storage")
        .context("the sandbox disk has no local-storage partition")?;
    let start = entry.starting_lba * 512;
    let mut data = vec![0u8; (8 * MIB) as usize];
    getrandom::fill(&mut data).map_err(|e| anyhow::anyhow!("random data: {e}"))?;
    file.seek(SeekFrom::Start(start))?;
    file.write_all(&data)?;
    file.sync_all()?;
    let mut storage = Storage {
        start,
        len: 64 * MIB,
        sha: String::new(),
    };
    storage.sha = fill_local_storage_sha(target, &storage)?;
    Ok(storage)
}

fn fill_local_storage_sha(target: &Path, storage: &Storage) -> Result<String> {
    let mut file = std::fs::File::open(target)?;
    file.seek(SeekFrom::Start(storage.start))?;
    let mut bytes = vec![0u8; storage.len as usize];
    file.read_exact(&mut bytes)?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

/// Serves `bytes` at `/os.img.zst` on 127.0.0.1 for the rest of the demo.
async fn serve_image(bytes: Vec<u8>) -> Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let bytes = axum::body::Bytes::from(bytes);
    let app = axum::Router::new().route(
        "/os.img.zst",
        axum::routing::get(move || {
            let bytes = bytes.clone();
            async move { bytes }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(format!("http://{address}/os.img.zst"))
}

/// The few API calls the demo makes.
struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    fn new(base: String, token: String) -> Client {
        reimage_agent::image::http::install_crypto_provider();
        Client {
            http: reqwest::Client::new(),
            base,
            token,
        }
    }

    async fn post(&self, path: &str, body: serde_json::Value) -> Result<serde_json::Value> {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await?;
        let status = response.status();
        let body: serde_json::Value = response.json().await?;
        if !status.is_success() {
            bail!("POST {path}: {status}: {body}");
        }
        Ok(body)
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T> {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await?
            .error_for_status()?;
        Ok(response.json().await?)
    }

    async fn add_task(&self, id: &str, command: &str, retention: Option<&str>) -> Result<()> {
        let mut body = json!({"id": id, "commandLine": command});
        if let Some(retention) = retention {
            body["constraints"] = json!({"retentionTime": retention});
        }
        self.post("/v1/tasks", body).await.map(|_| ())
    }

    async fn wait_task_state(&self, id: &str, state: &str) -> Result<Task> {
        for _ in 0..600 {
            let task: Task = self.get(&format!("/v1/tasks/{id}")).await?;
            if serde_json::to_value(task.state)? == state {
                return Ok(task);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("task {id} never became {state}")
    }

    async fn reimage(&self, option: &str, url: &str, sha256: &str) -> Result<Operation> {
        let body = json!({"nodeReimageOption": option, "image": {"url": url, "sha256": sha256}});
        Ok(serde_json::from_value(
            self.post("/v1/node/reimage", body).await?,
        )?)
    }

    /// Polls the operation and narrates each phase until it ends.
    async fn follow(&self, id: &str) -> Result<Operation> {
        let mut last_phase = None;
        loop {
            let op: Operation = self.get(&format!("/v1/operations/{id}")).await?;
            if op.phase.is_some() && op.phase != last_phase {
                say(&format!(
                    "  phase {:?}",
                    op.phase.unwrap_or(reimage_protocol::Phase::Done)
                ));
                last_phase = op.phase;
            }
            if op.status != OperationStatus::InProgress {
                return Ok(op);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
