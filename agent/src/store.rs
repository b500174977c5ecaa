//! Crash-safe persistence of the daemon's state: operations, tasks, node
//! settings and request ids, as JSON values under string keys in one redb
//! file (`state_dir/agent.redb`).
//!
//! Every [`Store::put`] and [`Store::delete`] is its own write transaction,
//! committed with immediate durability: when it returns, the change survives
//! `kill -9` and power loss. That is what lets the API acknowledge a request
//! only after it is stored.

use crate::{Error, Result};
use redb::{Database, Durability, ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt;
use std::path::Path;

/// The name of the database file inside the state directory.
const FILE_NAME: &str = "agent.redb";

/// The tables of the store; each holds JSON values under string keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Table {
    /// Reimage and reboot operations, by operation id.
    Operations,
    /// Local tasks, by task id.
    Tasks,
    /// Node-wide settings and counters.
    Node,
    /// `client-request-id` → operation id, for idempotent retries.
    RequestIds,
    /// Prefetched images, by the SHA-256 of the decoded image.
    Images,
}

impl Table {
    const ALL: [Table; 5] = [
        Table::Operations,
        Table::Tasks,
        Table::Node,
        Table::RequestIds,
        Table::Images,
    ];

    fn name(self) -> &'static str {
        match self {
            Table::Operations => "operations",
            Table::Tasks => "tasks",
            Table::Node => "node",
            Table::RequestIds => "request_ids",
            Table::Images => "images",
        }
    }

    fn definition(self) -> TableDefinition<'static, &'static str, &'static [u8]> {
        TableDefinition::new(self.name())
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The daemon's embedded database. `Send + Sync`: share it as `Arc<Store>`.
/// Calls block on disk I/O (a commit waits for fsync).
pub struct Store {
    db: Database,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

fn failed(what: impl fmt::Display, err: impl fmt::Display) -> Error {
    Error::StoreFailed(format!("{what}: {err}"))
}

impl Store {
    /// Opens (or creates) `state_dir/agent.redb`, creating `state_dir` too.
    pub fn open(state_dir: &Path) -> Result<Store> {
        std::fs::create_dir_all(state_dir)
            .map_err(|e| Error::io(format!("creating {}", state_dir.display()), e))?;
        let path = state_dir.join(FILE_NAME);
        let db = Database::create(&path)
            .map_err(|e| failed(format_args!("opening {}", path.display()), e))?;
        let store = Store { db };
        // Creating every table up front lets readers treat a missing key as
        // `None` without special-casing a table that was never written.
        store.write("creating tables", |txn| {
            for table in Table::ALL {
                txn.open_table(table.definition())
                    .map_err(|e| failed(format_args!("creating table {table}"), e))?;
            }
            Ok(())
        })?;
        Ok(store)
    }

    /// Stores `value` as JSON under `key`; durable once this returns.
    pub fn put<T: Serialize>(&self, table: Table, key: &str, value: &T) -> Result<()> {
        let json = serde_json::to_vec(value)
            .map_err(|e| failed(format_args!("encoding {table}/{key}"), e))?;
        self.write(&format!("writing {table}/{key}"), |txn| {
            let mut t = txn
                .open_table(table.definition())
                .map_err(|e| failed(format_args!("opening table {table}"), e))?;
            t.insert(key, json.as_slice())
                .map_err(|e| failed(format_args!("writing {table}/{key}"), e))?;
            Ok(())
        })
    }

    /// The value under `key`, or `None`. A value that does not decode as `T`
    /// is an error naming the table and key.
    pub fn get<T: DeserializeOwned>(&self, table: Table, key: &str) -> Result<Option<T>> {
        let txn = self
            .db
            .begin_read()
            .map_err(|e| failed(format_args!("reading {table}/{key}"), e))?;
        let t = txn
            .open_table(table.definition())
            .map_err(|e| failed(format_args!("opening table {table}"), e))?;
        let Some(bytes) = t
            .get(key)
            .map_err(|e| failed(format_args!("reading {table}/{key}"), e))?
        else {
            return Ok(None);
        };
        decode(table, key, bytes.value()).map(Some)
    }

    /// Every key and value of `table`, in key order.
    pub fn list<T: DeserializeOwned>(&self, table: Table) -> Result<Vec<(String, T)>> {
        let txn = self
            .db
            .begin_read()
            .map_err(|e| failed(format_args!("reading table {table}"), e))?;
        let t = txn
            .open_table(table.definition())
            .map_err(|e| failed(format_args!("opening table {table}"), e))?;
        let mut out = Vec::new();
        for entry in t
            .iter()
            .map_err(|e| failed(format_args!("reading table {table}"), e))?
        {
            let (key, value) =
                entry.map_err(|e| failed(format_args!("reading table {table}"), e))?;
            let key = key.value();
            out.push((key.to_owned(), decode(table, key, value.value())?));
        }
        Ok(out)
    }

    /// Removes `key` (nothing happens if it is absent); durable once this returns.
    pub fn delete(&self, table: Table, key: &str) -> Result<()> {
        self.write(&format!("deleting {table}/{key}"), |txn| {
            let mut t = txn
                .open_table(table.definition())
                .map_err(|e| failed(format_args!("opening table {table}"), e))?;
            t.remove(key)
                .map_err(|e| failed(format_args!("deleting {table}/{key}"), e))?;
            Ok(())
        })
    }

    /// Runs `f` in one write transaction and commits it durably.
    fn write(
        &self,
        what: &str,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<()>,
    ) -> Result<()> {
        let mut txn = self.db.begin_write().map_err(|e| failed(what, e))?;
        // Immediate is redb's default; it is spelled out because the API's
        // promise ("acknowledged means stored") rests on it.
        txn.set_durability(Durability::Immediate);
        f(&txn)?;
        txn.commit().map_err(|e| failed(what, e))
    }
}

fn decode<T: DeserializeOwned>(table: Table, key: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| failed(format_args!("decoding {table}/{key}"), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::process::Command;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Thing {
        name: String,
        n: u64,
    }

    fn thing(name: &str, n: u64) -> Thing {
        Thing {
            name: name.into(),
            n,
        }
    }

    #[test]
    fn round_trip_list_and_delete() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let store = Store::open(&dir.path().join("state"))?;
        assert_eq!(store.get::<Thing>(Table::Tasks, "a")?, None);
        store.put(Table::Tasks, "b", &thing("b", 2))?;
        store.put(Table::Tasks, "a", &thing("a", 1))?;
        store.put(Table::Operations, "a", &thing("op", 9))?;
        assert_eq!(store.get(Table::Tasks, "a")?, Some(thing("a", 1)));
        let listed: Vec<(String, Thing)> = store.list(Table::Tasks)?;
        assert_eq!(
            listed,
            vec![("a".into(), thing("a", 1)), ("b".into(), thing("b", 2))]
        );
        store.delete(Table::Tasks, "a")?;
        store.delete(Table::Tasks, "never-there")?;
        assert_eq!(store.get::<Thing>(Table::Tasks, "a")?, None);
        assert_eq!(store.list::<Thing>(Table::Tasks)?.len(), 1);
        assert_eq!(store.get(Table::Operations, "a")?, Some(thing("op", 9)));
        Ok(())
    }

    #[test]
    fn reopening_keeps_the_data() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        {
            let store = Store::open(dir.path())?;
            store.put(Table::Node, "counter", &41u64)?;
        }
        let store = Store::open(dir.path())?;
        assert_eq!(store.get::<u64>(Table::Node, "counter")?, Some(41));
        Ok(())
    }

    #[test]
    fn a_value_of_the_wrong_shape_is_an_error_naming_table_and_key() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let store = Store::open(dir.path())?;
        store.put(Table::Tasks, "t1", &"not a thing")?;
        let err = store
            .get::<Thing>(Table::Tasks, "t1")
            .expect_err("wrong shape");
        assert_eq!(err.code(), "StoreFailed");
        assert!(err.to_string().contains("tasks/t1"), "{err}");
        let err = store.list::<Thing>(Table::Tasks).expect_err("wrong shape");
        assert!(err.to_string().contains("tasks/t1"), "{err}");
        Ok(())
    }

    /// Set in the child process of
    /// [`a_put_survives_the_process_being_killed_right_after`].
    const ABORT_DIR_ENV: &str = "REIMAGE_STORE_TEST_ABORT_DIR";

    /// The child's half: stores a value and dies at once, with no destructor
    /// or flush after `put` returned. A no-op in a normal test run.
    #[test]
    fn child_puts_then_aborts() -> Result<()> {
        let Some(dir) = std::env::var_os(ABORT_DIR_ENV) else {
            return Ok(());
        };
        let store = Store::open(Path::new(&dir))?;
        store.put(Table::Operations, "acknowledged", &thing("kept", 7))?;
        std::process::abort();
    }

    #[test]
    fn a_put_survives_the_process_being_killed_right_after() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let exe = std::env::current_exe().map_err(|e| Error::io("finding the test binary", e))?;
        // Output captured so the child's test harness does not mix into ours.
        let output = Command::new(exe)
            .args([
                "--exact",
                "store::tests::child_puts_then_aborts",
                "--test-threads=1",
            ])
            .env(ABORT_DIR_ENV, dir.path())
            .output()
            .map_err(|e| Error::io("running the child", e))?;
        assert!(
            !output.status.success(),
            "the child must have aborted: {}",
            output.status
        );
        let store = Store::open(dir.path())?;
        assert_eq!(
            store.get(Table::Operations, "acknowledged")?,
            Some(thing("kept", 7))
        );
        Ok(())
    }
}
