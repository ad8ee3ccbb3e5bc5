//! `duplex box`: the host client of the controller's document service, through the
//! controller's vsock host bridge (job port 1024, like `duplex job`): accounts, boxes,
//! documents (`put` from a file, `get`, `list`, `rm`), rights, scans, and sharing with the
//! cloud (`share`, `pair`, `unpair`, `conflicts`, `shares`). Every request is
//! made as the account given with `--as` (default `admin`); the controller enforces the
//! rights (`docs/shared-data.md`). Each command prints one JSON object on stdout (`get`
//! without `--out` prints the document's bytes instead); errors go to stderr with their
//! code, and the exit status is 1.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use duplex_link::msg::{
    BoxObject, BoxOp, BoxReply, BoxRole, DocEntry, GrantEntry, MAX_BOX_CHUNK, MAX_BOX_DOCUMENT,
};
use duplex_link::print::Crc32;
use duplex_link::{HostReply, HostRequest};
use serde_json::{json, Value};

use crate::job::{JobClient, JobError};

/// Why a `duplex box` command failed.
#[derive(Debug, thiserror::Error)]
pub enum BoxError {
    /// The controller refused the request (the message has its code), or the link failed.
    #[error(transparent)]
    Link(#[from] JobError),
    /// A local file could not be read or written.
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A bad argument (an object that is not `box:ID` / `doc:ID`, a file too large).
    #[error("{0}")]
    Usage(String),
    /// The bytes received do not match the document's CRC.
    #[error(
        "document {id}: received {len} bytes with CRC {got:08x}, the controller says {want:08x}"
    )]
    Crc {
        id: String,
        len: u64,
        got: u32,
        want: u32,
    },
}

/// `duplex box ...`
#[derive(clap::Args)]
pub struct BoxArgs {
    /// The controller partition's vsock host-bridge socket (its config's `vsock.uds`).
    #[arg(long)]
    pub vsock: PathBuf,
    /// The account the request is made as.
    #[arg(long = "as", default_value = "admin")]
    pub account: String,
    /// Seconds one reply may take.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    #[command(subcommand)]
    pub command: BoxCommand,
}

/// Account management (administrator only).
#[derive(clap::Subcommand)]
pub enum AccountCommand {
    /// Create an account.
    Add {
        /// The account id (letters, digits, `-`, `_`, `.`).
        id: String,
        /// Display name.
        #[arg(long)]
        name: String,
        /// Email address.
        #[arg(long)]
        email: Option<String>,
        /// The email is verified.
        #[arg(long)]
        verified: bool,
    },
    /// List the accounts.
    List,
    /// Remove an account and its rights.
    Remove {
        /// The account id.
        id: String,
    },
}

/// What `duplex box` does.
#[derive(clap::Subcommand)]
pub enum BoxCommand {
    /// Manage accounts (as `admin`).
    #[command(subcommand)]
    Account(AccountCommand),
    /// Create a box (the account becomes its owner).
    Create {
        /// The box id.
        #[arg(value_name = "BOX")]
        box_id: String,
        /// Display name (default: the id).
        #[arg(long)]
        name: Option<String>,
    },
    /// Delete a box with its documents.
    RemoveBox {
        /// The box id.
        #[arg(value_name = "BOX")]
        box_id: String,
    },
    /// List the boxes the account may list.
    Boxes,
    /// Store a file as a new document of a box.
    Put {
        /// The box id.
        #[arg(value_name = "BOX")]
        box_id: String,
        /// The file.
        file: PathBuf,
        /// The document's name (default: the file's name).
        #[arg(long)]
        name: Option<String>,
    },
    /// Get a document (to a file with --out, else its bytes on stdout).
    Get {
        /// The document id.
        doc: String,
        /// Where to write it.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// List a box's documents.
    List {
        /// The box id.
        #[arg(value_name = "BOX")]
        box_id: String,
    },
    /// Delete a document.
    Rm {
        /// The document id.
        doc: String,
    },
    /// Grant a role (owner, write, read) on `box:ID` or `doc:ID` to an account.
    Grant {
        object: String,
        role: String,
        account: String,
    },
    /// Revoke a role.
    Revoke {
        object: String,
        role: String,
        account: String,
    },
    /// List the grants on `box:ID` or `doc:ID`.
    Grants { object: String },
    /// Scan generated pages (the engine halftones them) into a new document of a box.
    Scan {
        /// The box id.
        #[arg(value_name = "BOX")]
        box_id: String,
        /// Number of pages.
        #[arg(long)]
        pages: u32,
        /// Seed of the generated page content.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Page width in pixels.
        #[arg(long, default_value_t = duplex_link::DEFAULT_PAGE_WIDTH)]
        width: u16,
        /// Page height in pixels.
        #[arg(long, default_value_t = duplex_link::DEFAULT_PAGE_HEIGHT)]
        height: u16,
        /// The document's name.
        #[arg(long)]
        name: String,
    },
    /// Share a box with the cloud (admin or an owner of the box): `share BOX --with cloud`.
    Share {
        #[arg(value_name = "BOX")]
        box_id: String,
        /// With whom: `cloud` (the only one in version 1).
        #[arg(long = "with", value_name = "cloud")]
        with: String,
    },
    /// Pair a device account with a cloud user by hand (admin).
    Pair { account: String, cloud_user: String },
    /// Unpair a device account (admin); automatic pairing then leaves it alone.
    Unpair { account: String },
    /// The conflicts of the last automatic pairing (admin).
    Conflicts,
    /// The shares and their sync state (admin).
    Shares,
}

/// `box:ID` or `doc:ID`.
pub fn parse_object(s: &str) -> Result<BoxObject, BoxError> {
    match s.split_once(':') {
        Some(("box", id)) if !id.is_empty() => Ok(BoxObject::Box(id.into())),
        Some(("doc", id)) if !id.is_empty() => Ok(BoxObject::Doc(id.into())),
        _ => Err(BoxError::Usage(format!(
            "object {s:?}: expected box:ID or doc:ID"
        ))),
    }
}

/// `owner`, `write` or `read`.
pub fn parse_role(s: &str) -> Result<BoxRole, BoxError> {
    match s {
        "owner" => Ok(BoxRole::Owner),
        "write" => Ok(BoxRole::Write),
        "read" => Ok(BoxRole::Read),
        _ => Err(BoxError::Usage(format!(
            "role {s:?}: expected owner, write or read"
        ))),
    }
}

/// The tuple of a grant: `box:ID#role@user:ACCOUNT`.
pub fn tuple(object: &BoxObject, role: BoxRole, account: &str) -> String {
    let (kind, id) = match object {
        BoxObject::Box(id) => ("box", id),
        BoxObject::Doc(id) => ("doc", id),
    };
    let role = match role {
        BoxRole::Owner => "owner",
        BoxRole::Write => "write",
        BoxRole::Read => "read",
    };
    format!("{kind}:{id}#{role}@user:{account}")
}

/// CRC-32/ISO-HDLC of `bytes` (the documents' CRC).
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut c = Crc32::new();
    c.update(bytes);
    c.finish()
}

/// A client of the document service, as one account.
pub struct BoxClient {
    link: JobClient,
    account: String,
}

impl BoxClient {
    /// Connects through the bridge socket `uds`, making requests as `account`.
    pub fn connect(uds: &Path, account: &str) -> Result<BoxClient, BoxError> {
        Ok(BoxClient {
            link: JobClient::connect(uds)?,
            account: account.into(),
        })
    }

    /// How long one reply may take.
    pub fn set_timeout(&mut self, t: Duration) -> Result<(), BoxError> {
        Ok(self.link.set_timeout(t)?)
    }

    /// One operation; its reply.
    pub fn call(&mut self, op: BoxOp) -> Result<BoxReply, BoxError> {
        let req = HostRequest::Box {
            account: self.account.clone(),
            op,
        };
        match self.link.call(&req)? {
            HostReply::Box(r) => Ok(r),
            other => Err(JobError::Unexpected(Box::new(other)).into()),
        }
    }

    fn expect_done(&mut self, op: BoxOp) -> Result<(), BoxError> {
        match self.call(op)? {
            BoxReply::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Stores `bytes` as a new document `name` of `box_id`, in chunks; the document once
    /// durable.
    pub fn put(&mut self, box_id: &str, name: &str, bytes: &[u8]) -> Result<DocEntry, BoxError> {
        let begin = BoxOp::PutBegin {
            box_id: box_id.into(),
            name: name.into(),
            len: bytes.len() as u64,
        };
        let put_id = match self.call(begin)? {
            BoxReply::PutStarted { put_id } => put_id,
            other => return Err(unexpected(other)),
        };
        let mut offset = 0u64;
        for part in bytes.chunks(MAX_BOX_CHUNK) {
            let op = BoxOp::PutData {
                put_id,
                offset,
                bytes: part.to_vec(),
            };
            match self.call(op)? {
                BoxReply::PutProgress { received, .. }
                    if received == offset + part.len() as u64 =>
                {
                    offset = received
                }
                other => return Err(unexpected(other)),
            }
        }
        let end = BoxOp::PutEnd {
            put_id,
            crc32: crc32(bytes),
        };
        match self.call(end)? {
            BoxReply::Stored(doc) => Ok(doc),
            other => Err(unexpected(other)),
        }
    }

    /// A whole document, read in chunks and checked against its CRC.
    pub fn get(&mut self, doc_id: &str) -> Result<(DocEntry, Vec<u8>), BoxError> {
        let mut out = Vec::new();
        loop {
            let op = BoxOp::Get {
                doc_id: doc_id.into(),
                offset: out.len() as u64,
                len: MAX_BOX_CHUNK as u32,
            };
            let (doc, bytes) = match self.call(op)? {
                BoxReply::Data { doc, bytes, .. } => (doc, bytes),
                other => return Err(unexpected(other)),
            };
            out.extend_from_slice(&bytes);
            if bytes.is_empty() || out.len() as u64 >= doc.len {
                let got = crc32(&out);
                if out.len() as u64 != doc.len || got != doc.crc32 {
                    return Err(BoxError::Crc {
                        id: doc.id,
                        len: out.len() as u64,
                        got,
                        want: doc.crc32,
                    });
                }
                return Ok((doc, out));
            }
        }
    }

    /// A box's documents.
    pub fn list(&mut self, box_id: &str) -> Result<Vec<DocEntry>, BoxError> {
        match self.call(BoxOp::ListBox {
            box_id: box_id.into(),
        })? {
            BoxReply::Docs(d) => Ok(d),
            other => Err(unexpected(other)),
        }
    }
}

fn unexpected(r: BoxReply) -> BoxError {
    JobError::Unexpected(Box::new(HostReply::Box(r))).into()
}

fn to_json<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

fn grants_json(object: &BoxObject, grants: &[GrantEntry]) -> Value {
    let tuples: Vec<String> = grants
        .iter()
        .map(|g| tuple(&g.object, g.role, &g.account))
        .collect();
    json!({ "object": to_json(object), "grants": tuples })
}

/// Runs `duplex box`; returns the JSON to print (`Null`: the output was written already).
pub fn run_box(args: &BoxArgs) -> Result<Value, BoxError> {
    let mut c = BoxClient::connect(&args.vsock, &args.account)?;
    c.set_timeout(Duration::from_secs(args.timeout.max(1)))?;
    match &args.command {
        BoxCommand::Account(AccountCommand::Add {
            id,
            name,
            email,
            verified,
        }) => {
            c.expect_done(BoxOp::AddAccount {
                id: id.clone(),
                name: name.clone(),
                email: email.clone(),
                email_verified: *verified,
            })?;
            Ok(json!({ "account": id, "added": true }))
        }
        BoxCommand::Account(AccountCommand::List) => match c.call(BoxOp::ListAccounts)? {
            BoxReply::Accounts(a) => Ok(json!({ "accounts": to_json(&a) })),
            other => Err(unexpected(other)),
        },
        BoxCommand::Account(AccountCommand::Remove { id }) => {
            c.expect_done(BoxOp::RemoveAccount { id: id.clone() })?;
            Ok(json!({ "account": id, "removed": true }))
        }
        BoxCommand::Create { box_id, name } => {
            c.expect_done(BoxOp::CreateBox {
                box_id: box_id.clone(),
                name: name.clone().unwrap_or_else(|| box_id.clone()),
            })?;
            Ok(json!({ "box": box_id, "created": true }))
        }
        BoxCommand::RemoveBox { box_id } => {
            c.expect_done(BoxOp::RemoveBox {
                box_id: box_id.clone(),
            })?;
            Ok(json!({ "box": box_id, "removed": true }))
        }
        BoxCommand::Boxes => match c.call(BoxOp::ListBoxes)? {
            BoxReply::Boxes(b) => Ok(json!({ "boxes": to_json(&b) })),
            other => Err(unexpected(other)),
        },
        BoxCommand::Put { box_id, file, name } => {
            let file_err = |source| BoxError::File {
                path: file.clone(),
                source,
            };
            let len = std::fs::metadata(file).map_err(file_err)?.len();
            if len > MAX_BOX_DOCUMENT {
                return Err(BoxError::Usage(format!(
                    "{}: {len} bytes is more than a document may hold ({MAX_BOX_DOCUMENT})",
                    file.display()
                )));
            }
            let bytes = std::fs::read(file).map_err(file_err)?;
            let name = match name {
                Some(n) => n.clone(),
                None => file
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "document".into()),
            };
            let doc = c.put(box_id, &name, &bytes)?;
            Ok(json!({ "stored": to_json(&doc) }))
        }
        BoxCommand::Get { doc, out } => {
            let (meta, bytes) = c.get(doc)?;
            match out {
                Some(path) => {
                    std::fs::write(path, &bytes).map_err(|source| BoxError::File {
                        path: path.clone(),
                        source,
                    })?;
                    Ok(json!({ "doc": to_json(&meta), "out": path, "bytes": bytes.len() }))
                }
                None => {
                    let mut stdout = std::io::stdout().lock();
                    stdout
                        .write_all(&bytes)
                        .and_then(|()| stdout.flush())
                        .map_err(|source| BoxError::File {
                            path: "<stdout>".into(),
                            source,
                        })?;
                    Ok(Value::Null)
                }
            }
        }
        BoxCommand::List { box_id } => {
            let docs = c.list(box_id)?;
            Ok(json!({ "box": box_id, "documents": to_json(&docs) }))
        }
        BoxCommand::Rm { doc } => {
            c.expect_done(BoxOp::DeleteDoc {
                doc_id: doc.clone(),
            })?;
            Ok(json!({ "deleted": doc }))
        }
        BoxCommand::Grant {
            object,
            role,
            account,
        }
        | BoxCommand::Revoke {
            object,
            role,
            account,
        } => {
            let o = parse_object(object)?;
            let r = parse_role(role)?;
            let t = tuple(&o, r, account);
            if matches!(args.command, BoxCommand::Grant { .. }) {
                c.expect_done(BoxOp::Grant {
                    object: o,
                    role: r,
                    account: account.clone(),
                })?;
                Ok(json!({ "granted": t }))
            } else {
                c.expect_done(BoxOp::Revoke {
                    object: o,
                    role: r,
                    account: account.clone(),
                })?;
                Ok(json!({ "revoked": t }))
            }
        }
        BoxCommand::Grants { object } => {
            let o = parse_object(object)?;
            match c.call(BoxOp::ListGrants { object: o.clone() })? {
                BoxReply::Grants(g) => Ok(grants_json(&o, &g)),
                other => Err(unexpected(other)),
            }
        }
        BoxCommand::Scan {
            box_id,
            pages,
            seed,
            width,
            height,
            name,
        } => {
            let op = BoxOp::Scan {
                box_id: box_id.clone(),
                name: name.clone(),
                pages: *pages,
                seed: *seed,
                width: *width,
                height: *height,
            };
            match c.call(op)? {
                BoxReply::Stored(doc) => Ok(json!({ "stored": to_json(&doc), "pages": pages })),
                other => Err(unexpected(other)),
            }
        }
        BoxCommand::Share { box_id, with } => {
            if with != "cloud" {
                return Err(BoxError::Usage(format!("--with {with}: only `cloud`")));
            }
            c.expect_done(BoxOp::Share {
                box_id: box_id.clone(),
            })?;
            Ok(json!({ "box": box_id, "shared_with": "cloud" }))
        }
        BoxCommand::Pair {
            account,
            cloud_user,
        } => {
            c.expect_done(BoxOp::Pair {
                account: account.clone(),
                cloud_user: cloud_user.clone(),
            })?;
            Ok(json!({ "paired": { "account": account, "cloud_user": cloud_user } }))
        }
        BoxCommand::Unpair { account } => {
            c.expect_done(BoxOp::Unpair {
                account: account.clone(),
            })?;
            Ok(json!({ "unpaired": account }))
        }
        BoxCommand::Conflicts => match c.call(BoxOp::ListConflicts)? {
            BoxReply::Conflicts(list) => Ok(json!({ "conflicts": to_json(&list) })),
            other => Err(unexpected(other)),
        },
        BoxCommand::Shares => match c.call(BoxOp::ListShares)? {
            BoxReply::Shares(list) => Ok(json!({ "shares": to_json(&list) })),
            other => Err(unexpected(other)),
        },
    }
}
