//! The cloud's SQLite file of the shares it received (`share_db`, `docs/mediator.md`):
//! per share (device id, share id) its revision and state (JSON of
//! [`duplex_docs::ShareState`]), and the bytes of its documents once all received. Read
//! once at start ([`ShareDb::load`]), written after every revision applied
//! ([`ShareDb::save`]). Bytes of a document still arriving are not kept: after a restart
//! the device sends them again (its next chunk is refused, it sends a snapshot, the
//! cloud's ack lists the document in `need_data`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use duplex_docs::ShareState;
use rusqlite::{params, Connection};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS shares (
    device_id  TEXT NOT NULL,
    share_id   TEXT NOT NULL,
    revision   INTEGER NOT NULL,
    state      TEXT NOT NULL,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (device_id, share_id)
);
CREATE TABLE IF NOT EXISTS share_documents (
    device_id TEXT NOT NULL,
    share_id  TEXT NOT NULL,
    doc_id    TEXT NOT NULL,
    len       INTEGER NOT NULL,
    crc32     INTEGER NOT NULL,
    bytes     BLOB NOT NULL,
    PRIMARY KEY (device_id, share_id, doc_id)
);
";

/// Why the share database failed.
#[derive(Debug, thiserror::Error)]
pub enum ShareDbError {
    #[error("share database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("share database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("share database: the state of share {device_id}/{share_id} is not readable: {why}")]
    Corrupt {
        device_id: String,
        share_id: String,
        why: String,
    },
    #[error("share database: state cannot be written: {0}")]
    Encode(#[from] serde_json::Error),
}

/// One share as stored.
pub struct StoredShare {
    pub device_id: String,
    pub share_id: String,
    pub revision: u64,
    pub state: ShareState,
    /// Complete documents' bytes by document id.
    pub documents: BTreeMap<String, Vec<u8>>,
}

/// The open database.
pub struct ShareDb {
    conn: Connection,
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl ShareDb {
    /// Opens (creating it if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<ShareDb, ShareDbError> {
        let open = || -> rusqlite::Result<Connection> {
            let conn = Connection::open(path)?;
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "synchronous", "NORMAL")?;
            conn.execute_batch(SCHEMA)?;
            Ok(conn)
        };
        open()
            .map(|conn| ShareDb { conn })
            .map_err(|source| ShareDbError::Open {
                path: path.to_path_buf(),
                source,
            })
    }

    /// Every share stored, with its complete documents.
    pub fn load(&self) -> Result<Vec<StoredShare>, ShareDbError> {
        let mut out = Vec::new();
        let mut shares = self
            .conn
            .prepare("SELECT device_id, share_id, revision, state FROM shares ORDER BY 1, 2")?;
        let rows = shares.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, String>(3)?,
            ))
        })?;
        for row in rows {
            let (device_id, share_id, revision, state) = row?;
            let corrupt = |why: String| ShareDbError::Corrupt {
                device_id: device_id.clone(),
                share_id: share_id.clone(),
                why,
            };
            let state: ShareState =
                serde_json::from_str(&state).map_err(|e| corrupt(e.to_string()))?;
            let revision =
                u64::try_from(revision).map_err(|_| corrupt("negative revision".into()))?;
            let mut docs = self.conn.prepare(
                "SELECT doc_id, bytes FROM share_documents WHERE device_id = ?1 AND share_id = ?2",
            )?;
            let documents = docs
                .query_map(params![device_id, share_id], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
                })?
                .collect::<rusqlite::Result<BTreeMap<_, _>>>()?;
            out.push(StoredShare {
                device_id,
                share_id,
                revision,
                state,
                documents,
            });
        }
        Ok(out)
    }

    /// Writes a share's revision and state, and its complete documents: `write` are the
    /// documents to (re)write, `keep` every document id that stays stored (others go).
    pub fn save(
        &mut self,
        device_id: &str,
        share_id: &str,
        revision: u64,
        state: &ShareState,
        write: &[(&str, &[u8])],
        keep: &[&str],
    ) -> Result<(), ShareDbError> {
        let json = serde_json::to_string(state)?;
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO shares (device_id, share_id, revision, state, updated_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (device_id, share_id) DO UPDATE
             SET revision = excluded.revision, state = excluded.state,
                 updated_ms = excluded.updated_ms",
            params![
                device_id,
                share_id,
                to_i64(revision),
                json,
                to_i64(crate::util::now_ms())
            ],
        )?;
        {
            let mut ids = tx.prepare(
                "SELECT doc_id FROM share_documents WHERE device_id = ?1 AND share_id = ?2",
            )?;
            let stored = ids
                .query_map(params![device_id, share_id], |r| r.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            for id in stored.iter().filter(|id| !keep.contains(&id.as_str())) {
                tx.execute(
                    "DELETE FROM share_documents
                     WHERE device_id = ?1 AND share_id = ?2 AND doc_id = ?3",
                    params![device_id, share_id, id],
                )?;
            }
        }
        for (id, bytes) in write {
            tx.execute(
                "INSERT OR REPLACE INTO share_documents
                 (device_id, share_id, doc_id, len, crc32, bytes)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    device_id,
                    share_id,
                    id,
                    to_i64(bytes.len() as u64),
                    i64::from(duplex_docs::document_crc32(bytes)),
                    bytes
                ],
            )?;
        }
        tx.commit()?;
        Ok(())
    }
}
