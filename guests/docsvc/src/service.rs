//! [`DocService`]: opening, accounts, boxes, grants and the rights checks. Documents are in
//! `documents.rs`.

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use duplex_docs::{
    check, normalize_email, valid_id, valid_name, Account, Denied, DocBox, Document, Grant, Object,
    Op, Role, Target, ADMIN,
};
use duplex_store::{BlockDevice, Store, StoreStats};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::documents::Upload;
use crate::{keys, DocError, FORMAT_VERSION};

/// The service's own record (`svc/meta`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// [`FORMAT_VERSION`].
    pub version: u32,
    /// The number of the next document (its id is `d<n>`); never reused.
    pub next_doc: u64,
}

/// Limits on what the service keeps; [`Limits::default`] is what the controller uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most accounts (besides `admin`).
    pub accounts: usize,
    /// Most boxes.
    pub boxes: usize,
    /// Most grants.
    pub grants: usize,
    /// Most uploads in progress (one more evicts the oldest).
    pub uploads: usize,
    /// Most bytes announced by the uploads in progress together.
    pub upload_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            accounts: 1024,
            boxes: 1024,
            grants: 4096,
            uploads: 4,
            upload_bytes: 32 << 20,
        }
    }
}

/// What the service holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceStats {
    pub accounts: usize,
    pub boxes: usize,
    pub documents: usize,
    pub grants: usize,
    /// Bytes of all documents.
    pub document_bytes: u64,
    /// The store's own counters.
    pub store: StoreStats,
}

/// The document service over a block device (see the crate's doc).
pub struct DocService<D: BlockDevice> {
    pub(crate) store: Store<D>,
    pub(crate) meta: Meta,
    pub(crate) accounts: BTreeMap<String, Account>,
    pub(crate) boxes: BTreeMap<String, DocBox>,
    /// Documents by number (id `d<n>`).
    pub(crate) docs: BTreeMap<u64, Document>,
    pub(crate) grants: Vec<Grant>,
    pub(crate) uploads: BTreeMap<u64, Upload>,
    pub(crate) next_put: u64,
    pub(crate) limits: Limits,
    /// The last chunk read: (document number, chunk index, bytes).
    pub(crate) cache: Option<(u64, u32, Vec<u8>)>,
    /// Pairs, conflicts, shares and the exchange in progress (`sharing.rs`).
    pub(crate) sharing: crate::sharing::Sharing,
}

pub(crate) fn encode<T: Serialize + ?Sized>(v: &T) -> Result<Vec<u8>, DocError> {
    postcard::to_allocvec(v).map_err(|_| DocError::Corrupted("a value does not encode"))
}

fn decode<T: DeserializeOwned>(bytes: &[u8], what: &'static str) -> Result<T, DocError> {
    postcard::from_bytes(bytes).map_err(|_| DocError::Corrupted(what))
}

/// A collection kept in one value (empty when absent).
fn load_list<D: BlockDevice, T: DeserializeOwned>(
    store: &mut Store<D>,
    key: &[u8],
    what: &'static str,
) -> Result<Vec<T>, DocError> {
    match store.get(key)? {
        Some(b) => decode(&b, what),
        None => Ok(Vec::new()),
    }
}

/// The number of document id `d<n>`.
pub(crate) fn doc_number(id: &str) -> Option<u64> {
    let digits = id.strip_prefix('d')?;
    if digits.is_empty() || digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The tuple form of an object: `box:ID` or `doc:ID`.
pub(crate) fn object_name(o: &Object) -> String {
    match o {
        Object::Box(id) => format!("box:{id}"),
        Object::Doc(id) => format!("doc:{id}"),
    }
}

/// One item of a transaction: a key and its new value (or removal).
pub(crate) type Item = (Vec<u8>, Option<Vec<u8>>);

impl<D: BlockDevice> DocService<D> {
    /// Opens the service on `dev` (formatting a blank disk) with the default limits.
    pub fn open(dev: D) -> Result<Self, DocError> {
        Self::open_with(dev, Limits::default())
    }

    /// Opens the service on `dev` with `limits`.
    pub fn open_with(dev: D, limits: Limits) -> Result<Self, DocError> {
        let mut store = Store::open(dev)?;
        let meta = match store.get(keys::META)? {
            Some(b) => decode::<Meta>(&b, "svc/meta")?,
            None => Meta {
                version: FORMAT_VERSION,
                next_doc: 1,
            },
        };
        if meta.version != FORMAT_VERSION {
            return Err(DocError::Corrupted("svc/meta: another format version"));
        }
        let accounts: Vec<Account> = load_list(&mut store, keys::ACCOUNTS, "svc/accounts")?;
        let boxes: Vec<DocBox> = load_list(&mut store, keys::BOXES, "svc/boxes")?;
        let grants: Vec<Grant> = load_list(&mut store, keys::GRANTS, "svc/grants")?;
        let sharing = crate::sharing::Sharing::load(&mut store)?;
        let mut docs = BTreeMap::new();
        for key in store.keys(keys::DOC)? {
            let Some(value) = store.get(&key)? else {
                return Err(DocError::Corrupted("a listed document vanished"));
            };
            let doc: Document = decode(&value, "a document's metadata")?;
            let n = doc_number(&doc.id).ok_or(DocError::Corrupted("a document id"))?;
            docs.insert(n, doc);
        }
        Ok(DocService {
            store,
            meta,
            accounts: accounts.into_iter().map(|a| (a.id.clone(), a)).collect(),
            boxes: boxes.into_iter().map(|b| (b.id.clone(), b)).collect(),
            docs,
            grants,
            uploads: BTreeMap::new(),
            next_put: 1,
            limits,
            cache: None,
            sharing,
        })
    }

    /// Counts and the store's statistics.
    pub fn stats(&self) -> ServiceStats {
        ServiceStats {
            accounts: self.accounts.len(),
            boxes: self.boxes.len(),
            documents: self.docs.len(),
            grants: self.grants.len(),
            document_bytes: self.docs.values().map(|d| d.len).sum(),
            store: self.store.stats(),
        }
    }

    // ---- checks ---------------------------------------------------------------------

    /// The request's account exists (`admin` always does).
    pub(crate) fn known(&self, who: &str) -> Result<(), DocError> {
        if who == ADMIN || self.accounts.contains_key(who) {
            Ok(())
        } else {
            Err(DocError::UnknownAccount(who.into()))
        }
    }

    fn admin_only(&self, who: &str) -> Result<(), DocError> {
        self.known(who)?;
        if who == ADMIN {
            Ok(())
        } else {
            Err(DocError::Denied {
                needed: "admin",
                object: "accounts".into(),
            })
        }
    }

    /// `check` for `op` on `target`, as a [`DocError`].
    pub(crate) fn may(&self, who: &str, op: Op, target: Target<'_>) -> Result<(), DocError> {
        check(&self.grants, who, op, target).map_err(|d| {
            let object = match target {
                Target::Box(b) => format!("box:{b}"),
                Target::Doc { doc_id, .. } => format!("doc:{doc_id}"),
            };
            match d {
                Denied::Insufficient { needed } => DocError::Denied {
                    needed: needed.as_str(),
                    object,
                },
                other => DocError::BadRequest(format!("{other:?} on {object}")),
            }
        })
    }

    /// The document `doc_id` (by id).
    pub(crate) fn doc(&self, doc_id: &str) -> Result<&Document, DocError> {
        doc_number(doc_id)
            .and_then(|n| self.docs.get(&n))
            .ok_or_else(|| DocError::not_found("document", doc_id))
    }

    /// The rights target of an object, checking that it exists.
    fn target<'a>(&'a self, o: &'a Object) -> Result<Target<'a>, DocError> {
        match o {
            Object::Box(id) if self.boxes.contains_key(id) => Ok(Target::Box(id)),
            Object::Box(id) => Err(DocError::not_found("box", id)),
            Object::Doc(id) => {
                let d = self.doc(id)?;
                Ok(Target::Doc {
                    box_id: &d.box_id,
                    doc_id: &d.id,
                })
            }
        }
    }

    // ---- writes ---------------------------------------------------------------------

    /// Writes `items` in one transaction (durable when `Ok`).
    pub(crate) fn commit(&mut self, items: &[Item]) -> Result<(), DocError> {
        let refs: Vec<(&[u8], Option<&[u8]>)> = items
            .iter()
            .map(|(k, v)| (k.as_slice(), v.as_deref()))
            .collect();
        self.store.put_many(&refs)?;
        Ok(())
    }

    pub(crate) fn accounts_item(accounts: &BTreeMap<String, Account>) -> Result<Item, DocError> {
        let v: Vec<&Account> = accounts.values().collect();
        Ok((keys::ACCOUNTS.to_vec(), Some(encode(&v)?)))
    }

    pub(crate) fn boxes_item(boxes: &BTreeMap<String, DocBox>) -> Result<Item, DocError> {
        let v: Vec<&DocBox> = boxes.values().collect();
        Ok((keys::BOXES.to_vec(), Some(encode(&v)?)))
    }

    pub(crate) fn grants_item(grants: &[Grant]) -> Result<Item, DocError> {
        Ok((keys::GRANTS.to_vec(), Some(encode(grants)?)))
    }

    // ---- accounts (administrator only) ----------------------------------------------

    /// Creates an account (`who` must be `admin`). The email, if any, must normalise
    /// (`normalize_email`); it is kept as entered.
    pub fn add_account(&mut self, who: &str, account: Account) -> Result<(), DocError> {
        self.admin_only(who)?;
        if !valid_id(&account.id) {
            return Err(DocError::Invalid(format!("account id {:?}", account.id)));
        }
        if !valid_name(&account.name) {
            return Err(DocError::Invalid(format!(
                "account name {:?}",
                account.name
            )));
        }
        if let Some(e) = &account.email {
            if normalize_email(e).is_none() {
                return Err(DocError::Invalid(format!("email {e:?}")));
            }
        }
        if account.id == ADMIN || self.accounts.contains_key(&account.id) {
            return Err(DocError::Exists {
                kind: "account",
                id: account.id,
            });
        }
        if self.accounts.len() >= self.limits.accounts {
            return Err(DocError::Invalid(format!(
                "at most {} accounts",
                self.limits.accounts
            )));
        }
        let mut accounts = self.accounts.clone();
        accounts.insert(account.id.clone(), account);
        self.commit(&[Self::accounts_item(&accounts)?])?;
        self.accounts = accounts;
        Ok(())
    }

    /// Every account, in id order (`admin` only; `admin` itself is implicit, not listed).
    pub fn accounts(&self, who: &str) -> Result<Vec<Account>, DocError> {
        self.admin_only(who)?;
        Ok(self.accounts.values().cloned().collect())
    }

    /// Removes an account and every grant it holds (`admin` only).
    pub fn remove_account(&mut self, who: &str, id: &str) -> Result<(), DocError> {
        self.admin_only(who)?;
        if id == ADMIN {
            return Err(DocError::Invalid(
                "the administrator cannot be removed".into(),
            ));
        }
        if !self.accounts.contains_key(id) {
            return Err(DocError::not_found("account", id));
        }
        let mut accounts = self.accounts.clone();
        accounts.remove(id);
        let grants: Vec<Grant> = self
            .grants
            .iter()
            .filter(|g| g.account != id)
            .cloned()
            .collect();
        let unpaired = self.unpair_removed_item(id)?;
        let mut items = vec_items([Self::accounts_item(&accounts)?, Self::grants_item(&grants)?]);
        let pairings = unpaired.map(|(item, p)| {
            items.push(item);
            p
        });
        self.commit(&items)?;
        self.accounts = accounts;
        self.grants = grants;
        self.shared_account_removed(id, pairings);
        Ok(())
    }

    // ---- boxes ----------------------------------------------------------------------

    /// Creates a box; `who` gets `owner` on it.
    pub fn create_box(&mut self, who: &str, id: &str, name: &str) -> Result<(), DocError> {
        self.known(who)?;
        if !valid_id(id) {
            return Err(DocError::Invalid(format!("box id {id:?}")));
        }
        if !valid_name(name) {
            return Err(DocError::Invalid(format!("box name {name:?}")));
        }
        if self.boxes.contains_key(id) {
            return Err(DocError::Exists {
                kind: "box",
                id: id.into(),
            });
        }
        if self.boxes.len() >= self.limits.boxes || self.grants.len() >= self.limits.grants {
            return Err(DocError::Invalid(format!(
                "at most {} boxes and {} grants",
                self.limits.boxes, self.limits.grants
            )));
        }
        let mut boxes = self.boxes.clone();
        boxes.insert(
            id.into(),
            DocBox {
                id: id.into(),
                name: name.into(),
            },
        );
        let mut grants = self.grants.clone();
        grants.push(Grant::on_box(id, Role::Owner, who));
        grants.sort();
        self.commit(&[Self::boxes_item(&boxes)?, Self::grants_item(&grants)?])?;
        self.boxes = boxes;
        self.grants = grants;
        Ok(())
    }

    /// The boxes `who` may list, in id order.
    pub fn boxes(&self, who: &str) -> Result<Vec<DocBox>, DocError> {
        self.known(who)?;
        Ok(self
            .boxes
            .values()
            .filter(|b| check(&self.grants, who, Op::ListBox, Target::Box(&b.id)).is_ok())
            .cloned()
            .collect())
    }

    /// Deletes a box, its documents and every grant on them (`owner` on the box).
    pub fn remove_box(&mut self, who: &str, id: &str) -> Result<(), DocError> {
        self.known(who)?;
        if !self.boxes.contains_key(id) {
            return Err(DocError::not_found("box", id));
        }
        self.may(who, Op::DeleteBox, Target::Box(id))?;
        if self.is_shared(id) {
            return Err(DocError::Exists {
                kind: "share of box",
                id: id.into(),
            });
        }
        let gone: Vec<(u64, Document)> = self
            .docs
            .iter()
            .filter(|(_, d)| d.box_id == id)
            .map(|(n, d)| (*n, d.clone()))
            .collect();
        let mut boxes = self.boxes.clone();
        boxes.remove(id);
        let grants: Vec<Grant> = self
            .grants
            .iter()
            .filter(|g| match &g.object {
                Object::Box(b) => b != id,
                Object::Doc(d) => !gone.iter().any(|(_, doc)| &doc.id == d),
            })
            .cloned()
            .collect();
        let mut items = vec_items([Self::boxes_item(&boxes)?, Self::grants_item(&grants)?]);
        for (_, d) in &gone {
            crate::documents::removal_items(d, &mut items);
        }
        self.commit(&items)?;
        self.boxes = boxes;
        self.grants = grants;
        for (n, _) in gone {
            self.docs.remove(&n);
        }
        self.cache = None;
        Ok(())
    }

    // ---- grants ---------------------------------------------------------------------

    /// Grants `g.role` on `g.object` to `g.account` (`owner` on the object; a grant held
    /// already changes nothing).
    pub fn grant(&mut self, who: &str, g: Grant) -> Result<(), DocError> {
        self.known(who)?;
        self.check_grant(who, &g)?;
        if self.grants.contains(&g) {
            return Ok(());
        }
        if self.grants.len() >= self.limits.grants {
            return Err(DocError::Invalid(format!(
                "at most {} grants",
                self.limits.grants
            )));
        }
        let mut grants = self.grants.clone();
        grants.push(g.clone());
        grants.sort();
        self.commit(&[Self::grants_item(&grants)?])?;
        self.grants = grants;
        self.shared_grant(&g, true);
        Ok(())
    }

    /// Revokes a grant (`owner` on the object; 404 if it is not held).
    pub fn revoke(&mut self, who: &str, g: &Grant) -> Result<(), DocError> {
        self.known(who)?;
        self.check_grant(who, g)?;
        let Some(pos) = self.grants.iter().position(|x| x == g) else {
            return Err(DocError::not_found("grant", &g.to_string()));
        };
        let mut grants = self.grants.clone();
        grants.remove(pos);
        self.commit(&[Self::grants_item(&grants)?])?;
        self.grants = grants;
        self.shared_grant(g, false);
        Ok(())
    }

    fn check_grant(&self, who: &str, g: &Grant) -> Result<(), DocError> {
        if !g.is_valid() {
            return Err(DocError::Invalid(format!("grant {g}")));
        }
        let target = self.target(&g.object)?;
        let op = match g.object {
            Object::Box(_) => Op::GrantOnBox,
            Object::Doc(_) => Op::GrantOnDoc,
        };
        self.may(who, op, target)?;
        if g.account != ADMIN && !self.accounts.contains_key(&g.account) {
            return Err(DocError::not_found("account", &g.account));
        }
        Ok(())
    }

    /// The grants on an object (`read` on it: list for a box, get for a document).
    pub fn grants(&self, who: &str, object: &Object) -> Result<Vec<Grant>, DocError> {
        self.known(who)?;
        let target = self.target(object)?;
        let op = match object {
            Object::Box(_) => Op::ListBox,
            Object::Doc(_) => Op::GetDoc,
        };
        self.may(who, op, target)?;
        Ok(self
            .grants
            .iter()
            .filter(|g| &g.object == object)
            .cloned()
            .collect())
    }

    /// Every grant (for tests and diagnostics).
    pub fn all_grants(&self) -> &[Grant] {
        &self.grants
    }

    /// The name of an object as in a tuple (`box:ID`, `doc:ID`).
    pub fn object_name(o: &Object) -> String {
        object_name(o)
    }

    /// Whether `id` names a box.
    pub fn has_box(&self, id: &str) -> bool {
        self.boxes.contains_key(id)
    }

    /// The account ids the service knows, `admin` first.
    pub fn account_ids(&self) -> Vec<String> {
        core::iter::once(ADMIN.to_string())
            .chain(self.accounts.keys().cloned())
            .collect()
    }
}

fn vec_items<const N: usize>(a: [Item; N]) -> Vec<Item> {
    a.into_iter().collect()
}
