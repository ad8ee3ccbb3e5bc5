//! The data model of the document service: accounts, boxes, documents, roles and rights
//! as tuples. See "Data model" in `docs/shared-data.md`.
//!
//! postcard writes an enum as its variant index then its fields in order: **never reorder
//! variants or fields**; add new ones at the end.

use alloc::string::{String, ToString};
use core::fmt;
use core::str::FromStr;

use crc::{Crc, CRC_32_ISO_HDLC};
use serde::{Deserialize, Serialize};

/// Longest account, box, document or cloud user identifier, in bytes (see [`valid_id`]).
pub const MAX_ID_LEN: usize = 64;
/// Longest account, box or document name, in bytes (see [`valid_name`]).
pub const MAX_NAME_LEN: usize = 128;
/// The device administrator's account id: it may do everything ([`crate::check`]) and is
/// the only account that may pair and unpair accounts by hand ([`crate::Pairings`]).
pub const ADMIN: &str = "admin";

/// Whether `id` is a valid account, box, document or cloud user identifier: 1 to
/// [`MAX_ID_LEN`] bytes of ASCII letters, digits, `-`, `_` or `.`. The tuple separators
/// `:`, `#` and `@` are excluded so that a [`Grant`] always parses back.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Whether `name` is a valid display name: 1 to [`MAX_NAME_LEN`] bytes of UTF-8 without
/// control characters.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_NAME_LEN && !name.chars().any(char::is_control)
}

/// The CRC of a document's bytes, [`Document::crc32`]: CRC-32/ISO-HDLC (zlib's), as the
/// print link's checksums.
pub fn document_crc32(bytes: &[u8]) -> u32 {
    Crc::<u32>::new(&CRC_32_ISO_HDLC).checksum(bytes)
}

/// A device user account.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Account {
    /// The account id (a [`valid_id`]); [`ADMIN`] is the administrator.
    pub id: String,
    /// Display name (a [`valid_name`]).
    pub name: String,
    /// The account's email as entered, if any (compared through
    /// [`crate::normalize_email`]).
    pub email: Option<String>,
    /// Whether the device verified the email (a confirmation code sent to it was
    /// returned). Only verified emails pair.
    pub email_verified: bool,
}

/// A document box: a named container of documents.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DocBox {
    /// The box id (a [`valid_id`]).
    pub id: String,
    /// Display name (a [`valid_name`]).
    pub name: String,
}

/// A document's metadata; its bytes live in the controller's storage (and, once shared,
/// in the cloud's), not here.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Document {
    /// The document id (a [`valid_id`], unique on the device).
    pub id: String,
    /// The box it is in.
    pub box_id: String,
    /// Display name (a [`valid_name`]), e.g. the file name it was put from.
    pub name: String,
    /// Length of its bytes.
    pub len: u64,
    /// [`document_crc32`] of its bytes.
    pub crc32: u32,
    /// The account that stored it (a scan job's or `duplex box put`'s account).
    pub created_by: String,
}

/// A role an account holds on a box or a document. `Owner` ⊇ `Write` ⊇ `Read`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Variant 0: everything on the object, including granting and revoking rights.
    Owner,
    /// Variant 1: reading and changing the object's documents.
    Write,
    /// Variant 2: reading.
    Read,
}

impl Role {
    /// The role's rank: `Read` 1, `Write` 2, `Owner` 3 (a role includes every role of a
    /// lower rank).
    pub fn rank(self) -> u8 {
        match self {
            Role::Owner => 3,
            Role::Write => 2,
            Role::Read => 1,
        }
    }

    /// Whether holding `self` includes `needed`.
    pub fn includes(self, needed: Role) -> bool {
        self.rank() >= needed.rank()
    }

    /// The role's name in a tuple: `owner`, `write` or `read`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Write => "write",
            Role::Read => "read",
        }
    }
}

/// The object a right is on.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Object {
    /// Variant 0: a box (the right applies to the box and every document in it).
    Box(String),
    /// Variant 1: one document (the right applies to that document only).
    Doc(String),
}

/// A right: `account` holds `role` on `object`. Written as the tuple
/// `box:ID#role@user:ID` or `doc:ID#role@user:ID` ([`fmt::Display`], [`FromStr`]).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Grant {
    pub object: Object,
    pub role: Role,
    /// The device account id.
    pub account: String,
}

impl Grant {
    /// A right on a box.
    pub fn on_box(box_id: &str, role: Role, account: &str) -> Self {
        Grant {
            object: Object::Box(box_id.to_string()),
            role,
            account: account.to_string(),
        }
    }

    /// A right on a document.
    pub fn on_doc(doc_id: &str, role: Role, account: &str) -> Self {
        Grant {
            object: Object::Doc(doc_id.to_string()),
            role,
            account: account.to_string(),
        }
    }

    /// Whether every identifier in the tuple is a [`valid_id`].
    pub fn is_valid(&self) -> bool {
        let id = match &self.object {
            Object::Box(id) | Object::Doc(id) => id,
        };
        valid_id(id) && valid_id(&self.account)
    }
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (kind, id) = match &self.object {
            Object::Box(id) => ("box", id),
            Object::Doc(id) => ("doc", id),
        };
        write!(
            f,
            "{kind}:{id}#{}@user:{}",
            self.role.as_str(),
            self.account
        )
    }
}

/// Why a tuple did not parse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseGrantError {
    /// Not of the form `KIND:ID#ROLE@user:ID`.
    Syntax,
    /// The object kind is not `box` or `doc`.
    Kind,
    /// The role is not `owner`, `write` or `read`.
    Role,
    /// An identifier is not a [`valid_id`].
    Id,
}

impl fmt::Display for ParseGrantError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ParseGrantError::Syntax => "expected KIND:ID#ROLE@user:ID",
            ParseGrantError::Kind => "the object kind must be box or doc",
            ParseGrantError::Role => "the role must be owner, write or read",
            ParseGrantError::Id => "an identifier is invalid",
        })
    }
}

impl FromStr for Grant {
    type Err = ParseGrantError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (object, rest) = s.split_once('#').ok_or(ParseGrantError::Syntax)?;
        let (role, user) = rest.split_once('@').ok_or(ParseGrantError::Syntax)?;
        let (kind, id) = object.split_once(':').ok_or(ParseGrantError::Syntax)?;
        let account = user.strip_prefix("user:").ok_or(ParseGrantError::Syntax)?;
        let role = match role {
            "owner" => Role::Owner,
            "write" => Role::Write,
            "read" => Role::Read,
            _ => return Err(ParseGrantError::Role),
        };
        if !valid_id(id) || !valid_id(account) {
            return Err(ParseGrantError::Id);
        }
        let object = match kind {
            "box" => Object::Box(id.to_string()),
            "doc" => Object::Doc(id.to_string()),
            _ => return Err(ParseGrantError::Kind),
        };
        Ok(Grant {
            object,
            role,
            account: account.to_string(),
        })
    }
}
