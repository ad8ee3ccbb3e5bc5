//! Pairing device accounts with cloud users ("Pairing" in `docs/shared-data.md`).
//!
//! The cloud lists its users SCIM-style ([`ScimListResponse`] of [`CloudUser`]s, page by
//! page). [`pair`] pairs a device account with a cloud user iff each has exactly one
//! verified, normalised ([`crate::normalize_email`]) email, the two are equal, and no
//! other device account or cloud user has that verified email. Every other case is a
//! [`Conflict`] for the administrator. Existing pairs are kept as they are and their
//! members are not considered again, so a later email change never re-pairs; the
//! administrator pairs and unpairs by hand ([`Pairings::admin_pair`],
//! [`Pairings::admin_unpair`]), and an account unpaired by hand is **held**: automatic
//! pairing leaves it alone until the administrator pairs it again.
//!
//! postcard writes an enum as its variant index then its fields in order: **never reorder
//! variants or fields**; add new ones at the end.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use serde::{Deserialize, Serialize};

use crate::email::normalize_email;
use crate::model::{valid_id, Account, ADMIN};

/// The SCIM core User schema URN (RFC 7643 §4.1).
pub const SCIM_USER_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:User";
/// The SCIM list response schema URN (RFC 7644 §3.4.2).
pub const SCIM_LIST_RESPONSE_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:ListResponse";
/// The page size (`count`) the controller asks for, and the most a cloud returns.
pub const MAX_SCIM_PAGE: u32 = 100;

/// One email of a SCIM user (`emails` multi-valued attribute). `verified` is not in RFC
/// 7643's core schema: the cloud service adds it (true only once the user proved the
/// mailbox); absent means unverified.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScimEmail {
    pub value: String,
    #[serde(default)]
    pub verified: bool,
    /// Informational: pairing ignores it.
    #[serde(default)]
    pub primary: bool,
}

/// A cloud user, as a SCIM User resource (JSON names as in RFC 7643).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CloudUser {
    /// `[SCIM_USER_SCHEMA]` in JSON.
    #[serde(default)]
    pub schemas: Vec<String>,
    /// The cloud's user id (must be a [`valid_id`] to pair).
    pub id: String,
    #[serde(default)]
    pub user_name: String,
    #[serde(default)]
    pub display_name: String,
    #[serde(default)]
    pub emails: Vec<ScimEmail>,
}

/// A page of `GET /scim/v2/Users?startIndex=S&count=N` (RFC 7644 §3.4.2; `startIndex` is
/// 1-based).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScimListResponse {
    /// `[SCIM_LIST_RESPONSE_SCHEMA]` in JSON.
    #[serde(default)]
    pub schemas: Vec<String>,
    pub total_results: u32,
    pub start_index: u32,
    pub items_per_page: u32,
    #[serde(rename = "Resources", default)]
    pub resources: Vec<CloudUser>,
}

impl ScimListResponse {
    /// The request path of the page starting at `start_index` (1-based).
    pub fn path(start_index: u32, count: u32) -> String {
        format!("/scim/v2/Users?startIndex={start_index}&count={count}")
    }

    /// The `startIndex` of the next page, or `None` when this page is the last one (or is
    /// empty: a page that makes no progress ends the listing).
    pub fn next_start_index(&self) -> Option<u32> {
        let n = u32::try_from(self.resources.len()).ok()?;
        if n == 0 {
            return None;
        }
        let next = self.start_index.max(1).checked_add(n)?;
        (next <= self.total_results).then_some(next)
    }
}

/// A device account and the cloud user it is paired with.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Pair {
    pub account: String,
    pub cloud_user: String,
}

/// Who a conflict is about.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Subject {
    /// Variant 0: a device account id.
    Account(String),
    /// Variant 1: a cloud user id.
    CloudUser(String),
}

/// Why an account or cloud user was not paired automatically.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConflictReason {
    /// Variant 0: nobody on the other side has this verified email.
    NoMatch,
    /// Variant 1: several device accounts have this verified email.
    SeveralOnDevice,
    /// Variant 2: several cloud users have this verified email.
    SeveralOnCloud,
    /// Variant 3: it has an email, but none verified.
    Unverified,
    /// Variant 4: it has no email.
    NoEmail,
    /// Variant 5: its (verified) email is not an acceptable address.
    InvalidEmail,
    /// Variant 6: (cloud user) it has several different verified emails.
    SeveralEmails,
    /// Variant 7: its only match is paired already, held by the administrator, or has
    /// several verified emails.
    MatchUnavailable,
    /// Variant 8: (account) the administrator unpaired it: only the administrator pairs it.
    HeldByAdmin,
    /// Variant 9: its id is not a [`valid_id`].
    InvalidId,
}

/// An account or cloud user that was not paired, and why.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Conflict {
    pub subject: Subject,
    pub reason: ConflictReason,
    /// The normalised email in question, when there is one.
    pub email: Option<String>,
}

/// What [`pair`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PairingResult {
    /// All pairs: the existing ones, unchanged, then the new ones.
    pub pairs: Vec<Pair>,
    /// The new pairs only.
    pub added: Vec<Pair>,
    /// The accounts and cloud users left unpaired, accounts first, in input order.
    pub conflicts: Vec<Conflict>,
}

/// Why a manual pairing operation was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PairError {
    /// Variant 0: only the administrator pairs and unpairs.
    NotAdmin,
    /// Variant 1: an id is not a [`valid_id`].
    InvalidId,
    /// Variant 2: the account is paired already (unpair it first).
    AccountPaired,
    /// Variant 3: the cloud user is paired already (unpair its account first).
    CloudUserPaired,
    /// Variant 4: the account is not paired.
    NotPaired,
}

/// The device's pairing state: the pairs and the accounts held out of automatic pairing.
/// The controller stores it; [`pair`] reads it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pairings {
    pub pairs: Vec<Pair>,
    /// Accounts the administrator unpaired: automatic pairing skips them.
    pub held: Vec<String>,
}

impl Pairings {
    /// The cloud user `account` is paired with.
    pub fn cloud_user_of(&self, account: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|p| p.account == account)
            .map(|p| p.cloud_user.as_str())
    }

    /// The account `cloud_user` is paired with.
    pub fn account_of(&self, cloud_user: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|p| p.cloud_user == cloud_user)
            .map(|p| p.account.as_str())
    }

    /// Runs [`pair`] and keeps its pairs; returns the result (new pairs, conflicts).
    pub fn auto_pair(&mut self, accounts: &[Account], users: &[CloudUser]) -> PairingResult {
        let result = pair(accounts, users, self);
        self.pairs.clone_from(&result.pairs);
        result
    }

    /// The administrator (`actor` must be [`ADMIN`]) pairs `account` with `cloud_user`,
    /// whatever their emails (the caller checks that both exist). Releases a hold.
    pub fn admin_pair(
        &mut self,
        actor: &str,
        account: &str,
        cloud_user: &str,
    ) -> Result<Pair, PairError> {
        if actor != ADMIN {
            return Err(PairError::NotAdmin);
        }
        if !valid_id(account) || !valid_id(cloud_user) {
            return Err(PairError::InvalidId);
        }
        if self.cloud_user_of(account).is_some() {
            return Err(PairError::AccountPaired);
        }
        if self.account_of(cloud_user).is_some() {
            return Err(PairError::CloudUserPaired);
        }
        let p = Pair {
            account: account.to_string(),
            cloud_user: cloud_user.to_string(),
        };
        self.held.retain(|h| h != account);
        self.pairs.push(p.clone());
        Ok(p)
    }

    /// The administrator unpairs `account` and holds it out of automatic pairing.
    pub fn admin_unpair(&mut self, actor: &str, account: &str) -> Result<Pair, PairError> {
        if actor != ADMIN {
            return Err(PairError::NotAdmin);
        }
        let i = self
            .pairs
            .iter()
            .position(|p| p.account == account)
            .ok_or(PairError::NotPaired)?;
        let p = self.pairs.remove(i);
        if !self.held.iter().any(|h| h == account) {
            self.held.push(account.to_string());
        }
        Ok(p)
    }

    /// `account` was removed from the device: its pair (returned) and hold go.
    pub fn remove_account(&mut self, account: &str) -> Option<Pair> {
        self.held.retain(|h| h != account);
        let i = self.pairs.iter().position(|p| p.account == account)?;
        Some(self.pairs.remove(i))
    }
}

/// The members of one normalised verified email.
#[derive(Default)]
struct Group<'a> {
    accounts: Vec<&'a str>,
    users: Vec<&'a str>,
}

fn conflict(subject: Subject, reason: ConflictReason, email: Option<&str>) -> Conflict {
    Conflict {
        subject,
        reason,
        email: email.map(str::to_string),
    }
}

/// Pairs `accounts` with `users` (see the module doc and `docs/shared-data.md`). Existing
/// pairs and held accounts in `existing` are kept as they are; an id listed twice on one
/// side counts once (the first entry).
pub fn pair(accounts: &[Account], users: &[CloudUser], existing: &Pairings) -> PairingResult {
    let paired_a: BTreeSet<&str> = existing.pairs.iter().map(|p| p.account.as_str()).collect();
    let paired_u: BTreeSet<&str> = existing
        .pairs
        .iter()
        .map(|p| p.cloud_user.as_str())
        .collect();
    let held: BTreeSet<&str> = existing.held.iter().map(String::as_str).collect();
    let mut groups: BTreeMap<String, Group<'_>> = BTreeMap::new();
    let mut conflicts = Vec::new();
    // Candidates: (id, normalised email) of unpaired members with one verified email.
    let mut cand_a: Vec<(&str, String)> = Vec::new();
    let mut cand_u: Vec<(&str, String)> = Vec::new();
    // Cloud users with several verified emails: in the groups, never pairable.
    let mut several_u: BTreeSet<&str> = BTreeSet::new();

    let mut seen = BTreeSet::new();
    for a in accounts {
        let id = a.id.as_str();
        if !seen.insert(id) {
            continue;
        }
        let free = !paired_a.contains(id);
        let subject = || Subject::Account(a.id.clone());
        if !valid_id(id) {
            if free {
                conflicts.push(conflict(subject(), ConflictReason::InvalidId, None));
            }
            continue;
        }
        let Some(raw) = &a.email else {
            if free {
                conflicts.push(conflict(subject(), ConflictReason::NoEmail, None));
            }
            continue;
        };
        let Some(email) = normalize_email(raw) else {
            if free {
                conflicts.push(conflict(subject(), ConflictReason::InvalidEmail, None));
            }
            continue;
        };
        if !a.email_verified {
            if free {
                conflicts.push(conflict(
                    subject(),
                    ConflictReason::Unverified,
                    Some(&email),
                ));
            }
            continue;
        }
        groups.entry(email.clone()).or_default().accounts.push(id);
        if free && held.contains(id) {
            conflicts.push(conflict(
                subject(),
                ConflictReason::HeldByAdmin,
                Some(&email),
            ));
        } else if free {
            cand_a.push((id, email));
        }
    }

    let mut user_conflicts = Vec::new();
    let mut seen = BTreeSet::new();
    for u in users {
        let id = u.id.as_str();
        if !seen.insert(id) {
            continue;
        }
        let free = !paired_u.contains(id);
        let subject = || Subject::CloudUser(u.id.clone());
        if !valid_id(id) {
            if free {
                user_conflicts.push(conflict(subject(), ConflictReason::InvalidId, None));
            }
            continue;
        }
        let verified: Vec<&ScimEmail> = u.emails.iter().filter(|e| e.verified).collect();
        let mut normal: Vec<String> = verified
            .iter()
            .filter_map(|e| normalize_email(&e.value))
            .collect();
        normal.sort();
        normal.dedup();
        let reason = if u.emails.is_empty() {
            Some(ConflictReason::NoEmail)
        } else if verified.is_empty() {
            Some(ConflictReason::Unverified)
        } else if normal.is_empty() {
            Some(ConflictReason::InvalidEmail)
        } else {
            None
        };
        if let Some(reason) = reason {
            if free {
                user_conflicts.push(conflict(subject(), reason, None));
            }
            continue;
        }
        for e in &normal {
            groups.entry(e.clone()).or_default().users.push(id);
        }
        if normal.len() > 1 {
            several_u.insert(id);
            if free {
                user_conflicts.push(conflict(subject(), ConflictReason::SeveralEmails, None));
            }
        } else if free {
            if let Some(e) = normal.pop() {
                cand_u.push((id, e));
            }
        }
    }

    let mut pairs = existing.pairs.clone();
    let mut added = Vec::new();
    for (id, email) in &cand_a {
        let Some(g) = groups.get(email) else { continue };
        let reason = match (g.accounts.len(), g.users.as_slice()) {
            (n, _) if n > 1 => ConflictReason::SeveralOnDevice,
            (_, []) => ConflictReason::NoMatch,
            (_, [u]) if paired_u.contains(u) || several_u.contains(u) => {
                ConflictReason::MatchUnavailable
            }
            (_, [u]) => {
                let p = Pair {
                    account: id.to_string(),
                    cloud_user: u.to_string(),
                };
                pairs.push(p.clone());
                added.push(p);
                continue;
            }
            _ => ConflictReason::SeveralOnCloud,
        };
        conflicts.push(conflict(
            Subject::Account(id.to_string()),
            reason,
            Some(email),
        ));
    }
    for (id, email) in &cand_u {
        let Some(g) = groups.get(email) else { continue };
        let reason = match (g.users.len(), g.accounts.as_slice()) {
            (n, _) if n > 1 => ConflictReason::SeveralOnCloud,
            (_, []) => ConflictReason::NoMatch,
            (_, [a]) if paired_a.contains(a) || held.contains(a) => {
                ConflictReason::MatchUnavailable
            }
            (_, [_]) => continue, // paired in the loop above
            _ => ConflictReason::SeveralOnDevice,
        };
        user_conflicts.push(conflict(
            Subject::CloudUser(id.to_string()),
            reason,
            Some(email),
        ));
    }
    conflicts.append(&mut user_conflicts);
    PairingResult {
        pairs,
        added,
        conflicts,
    }
}
