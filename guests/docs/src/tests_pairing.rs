//! Tests of email normalisation, automatic pairing and its conflicts, manual pairing,
//! and the SCIM shapes.

use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;

use crate::*;

fn acct(id: &str, email: Option<&str>, verified: bool) -> Account {
    Account {
        id: id.to_string(),
        name: id.to_string(),
        email: email.map(str::to_string),
        email_verified: verified,
    }
}

fn user(id: &str, emails: &[(&str, bool)]) -> CloudUser {
    CloudUser {
        schemas: vec![SCIM_USER_SCHEMA.to_string()],
        id: id.to_string(),
        user_name: id.to_string(),
        display_name: id.to_string(),
        emails: emails
            .iter()
            .map(|(v, verified)| ScimEmail {
                value: v.to_string(),
                verified: *verified,
                primary: false,
            })
            .collect(),
    }
}

fn p(account: &str, cloud_user: &str) -> Pair {
    Pair {
        account: account.to_string(),
        cloud_user: cloud_user.to_string(),
    }
}

/// The reason of the conflict about `subject`, if any.
fn reason(r: &PairingResult, subject: &Subject) -> Option<ConflictReason> {
    r.conflicts
        .iter()
        .find(|c| &c.subject == subject)
        .map(|c| c.reason)
}

fn a(id: &str) -> Subject {
    Subject::Account(id.to_string())
}

fn u(id: &str) -> Subject {
    Subject::CloudUser(id.to_string())
}

/// Pairs one device account (`verified`) with one cloud user (verified flag given).
fn one_to_one(device: &str, dv: bool, cloud: &str, cv: bool) -> PairingResult {
    pair(
        &[acct("a1", Some(device), dv)],
        &[user("c1", &[(cloud, cv)])],
        &Pairings::default(),
    )
}

#[test]
fn normalisation_trims_lowercases_and_composes() {
    let n = |s: &str| normalize_email(s);
    assert_eq!(n("Alice@Example.COM").as_deref(), Some("alice@example.com"));
    assert_eq!(
        n(" \t alice@example.com\r\n\u{00A0}\u{3000}").as_deref(),
        Some("alice@example.com")
    );
    // É precomposed (U+00C9) and E + COMBINING ACUTE (U+0301): both become U+00E9.
    assert_eq!(
        n("\u{00C9}lodie@x.fr").as_deref(),
        Some("\u{00E9}lodie@x.fr")
    );
    assert_eq!(
        n("E\u{0301}lodie@x.fr").as_deref(),
        Some("\u{00E9}lodie@x.fr")
    );
    // Turkish capital dotted I lowercases (locale-independently) to i + U+0307, not i.
    assert_eq!(n("\u{0130}nci@x.tr").as_deref(), Some("i\u{0307}nci@x.tr"));
    assert_eq!(n("\u{0131}nci@x.tr").as_deref(), Some("\u{0131}nci@x.tr"));
    // J + caron has no precomposed capital; lowercased, it composes to ǰ (U+01F0): the
    // second NFC.
    assert_eq!(n("J\u{030C}ane@x.cz").as_deref(), Some("\u{01F0}ane@x.cz"));
    assert_eq!(n("\u{01F0}ane@x.cz").as_deref(), Some("\u{01F0}ane@x.cz"));
    // The Kelvin sign is canonically K: NFC then lowercase gives k.
    assert_eq!(n("\u{212A}elvin@x.org").as_deref(), Some("kelvin@x.org"));
    // No case folding (ß stays), no NFKC (fullwidth stays), no Gmail folding.
    assert_eq!(
        n("Stra\u{00DF}e@x.de").as_deref(),
        Some("stra\u{00DF}e@x.de")
    );
    assert_eq!(n("\u{FF41}@x.jp").as_deref(), Some("\u{FF41}@x.jp"));
    assert_eq!(n("A.B+tag@Gmail.com").as_deref(), Some("a.b+tag@gmail.com"));
}

#[test]
fn normalisation_rejects_what_is_not_one_address() {
    let long_local = "x".repeat(MAX_LOCAL_LEN + 1) + "@x.org";
    let long = "x@".to_string() + &"y".repeat(MAX_EMAIL_LEN);
    for bad in [
        "",
        "   ",
        "alice",
        "alice@",
        "@example.com",
        "a@b@c.com",
        "al ice@example.com",
        "alice@exa\u{00A0}mple.com",
        "ali\u{0007}ce@example.com",
        long_local.as_str(),
        long.as_str(),
    ] {
        assert_eq!(normalize_email(bad), None, "{bad:?}");
    }
    assert!(normalize_email(&("x".repeat(MAX_LOCAL_LEN) + "@x.org")).is_some());
}

#[test]
fn the_same_verified_email_pairs() {
    let r = one_to_one("alice@example.com", true, "alice@example.com", true);
    assert_eq!(r.pairs, vec![p("a1", "c1")]);
    assert_eq!(r.added, r.pairs);
    assert!(r.conflicts.is_empty());
}

#[test]
fn case_whitespace_and_unicode_forms_pair() {
    let cases = [
        ("Alice@Example.COM", "alice@EXAMPLE.com"),
        ("  alice@example.com\t", "\u{00A0}alice@example.com\n"),
        ("\u{00C9}lodie@x.fr", "e\u{0301}LODIE@X.FR"),
        ("\u{212A}elvin@x.org", "kelvin@x.org"),
        ("J\u{030C}ane@x.cz", "\u{01F0}ane@x.cz"),
    ];
    for (d, c) in cases {
        let r = one_to_one(d, true, c, true);
        assert_eq!(r.pairs, vec![p("a1", "c1")], "{d:?} / {c:?}");
    }
}

#[test]
fn lookalikes_do_not_pair() {
    let cases = [
        ("\u{0130}nci@x.tr", "inci@x.tr"), // Turkish İ ≠ i
        ("\u{0131}nci@x.tr", "inci@x.tr"), // dotless ı ≠ i
        ("stra\u{00DF}e@x.de", "strasse@x.de"),
        ("\u{FF41}@x.jp", "a@x.jp"),
        ("a.b+tag@gmail.com", "ab@gmail.com"),
    ];
    for (d, c) in cases {
        let r = one_to_one(d, true, c, true);
        assert!(r.pairs.is_empty(), "{d:?} / {c:?}");
        assert_eq!(reason(&r, &a("a1")), Some(ConflictReason::NoMatch));
        assert_eq!(reason(&r, &u("c1")), Some(ConflictReason::NoMatch));
    }
}

#[test]
fn unverified_on_either_side_does_not_pair() {
    let r = one_to_one("alice@example.com", false, "alice@example.com", true);
    assert!(r.pairs.is_empty());
    assert_eq!(reason(&r, &a("a1")), Some(ConflictReason::Unverified));
    assert_eq!(reason(&r, &u("c1")), Some(ConflictReason::NoMatch));
    let r = one_to_one("alice@example.com", true, "alice@example.com", false);
    assert!(r.pairs.is_empty());
    assert_eq!(reason(&r, &a("a1")), Some(ConflictReason::NoMatch));
    assert_eq!(reason(&r, &u("c1")), Some(ConflictReason::Unverified));
}

#[test]
fn duplicates_on_the_device_go_to_conflicts() {
    let accounts = [
        acct("a1", Some("bob@example.com"), true),
        acct("a2", Some("BOB@example.com "), true),
    ];
    let r = pair(
        &accounts,
        &[user("c1", &[("bob@example.com", true)])],
        &Pairings::default(),
    );
    assert!(r.pairs.is_empty());
    assert_eq!(reason(&r, &a("a1")), Some(ConflictReason::SeveralOnDevice));
    assert_eq!(reason(&r, &a("a2")), Some(ConflictReason::SeveralOnDevice));
    assert_eq!(reason(&r, &u("c1")), Some(ConflictReason::SeveralOnDevice));
    assert_eq!(
        r.conflicts[0].email.as_deref(),
        Some("bob@example.com"),
        "the conflict names the email"
    );
}

#[test]
fn an_unverified_duplicate_does_not_block_the_verified_account() {
    let accounts = [
        acct("a1", Some("bob@example.com"), true),
        acct("a2", Some("bob@example.com"), false),
    ];
    let r = pair(
        &accounts,
        &[user("c1", &[("bob@example.com", true)])],
        &Pairings::default(),
    );
    assert_eq!(r.pairs, vec![p("a1", "c1")]);
    assert_eq!(reason(&r, &a("a2")), Some(ConflictReason::Unverified));
}

#[test]
fn duplicates_on_the_cloud_go_to_conflicts() {
    let users = [
        user("c1", &[("bob@example.com", true)]),
        user("c2", &[("Bob@Example.com", true)]),
    ];
    let r = pair(
        &[acct("a1", Some("bob@example.com"), true)],
        &users,
        &Pairings::default(),
    );
    assert!(r.pairs.is_empty());
    assert_eq!(reason(&r, &a("a1")), Some(ConflictReason::SeveralOnCloud));
    assert_eq!(reason(&r, &u("c1")), Some(ConflictReason::SeveralOnCloud));
    assert_eq!(reason(&r, &u("c2")), Some(ConflictReason::SeveralOnCloud));
}

#[test]
fn missing_and_invalid_emails_go_to_conflicts() {
    let accounts = [
        acct("a1", None, true),
        acct("a2", Some("not-an-address"), true),
    ];
    let users = [user("c1", &[]), user("c2", &[("x@@y", true)])];
    let r = pair(&accounts, &users, &Pairings::default());
    assert!(r.pairs.is_empty());
    assert_eq!(reason(&r, &a("a1")), Some(ConflictReason::NoEmail));
    assert_eq!(reason(&r, &a("a2")), Some(ConflictReason::InvalidEmail));
    assert_eq!(reason(&r, &u("c1")), Some(ConflictReason::NoEmail));
    assert_eq!(reason(&r, &u("c2")), Some(ConflictReason::InvalidEmail));
}

#[test]
fn a_cloud_user_pairs_on_its_one_verified_email_only() {
    let users = [user(
        "c1",
        &[("old@example.com", false), ("carol@example.com", true)],
    )];
    let accounts = [
        acct("a1", Some("carol@example.com"), true),
        acct("a2", Some("old@example.com"), true),
    ];
    let r = pair(&accounts, &users, &Pairings::default());
    assert_eq!(r.pairs, vec![p("a1", "c1")]);
    // The unverified email is ignored: no takeover through it.
    assert_eq!(reason(&r, &a("a2")), Some(ConflictReason::NoMatch));
}

#[test]
fn a_cloud_user_with_several_verified_emails_does_not_pair() {
    let users = [user(
        "c1",
        &[("one@example.com", true), ("two@example.com", true)],
    )];
    let r = pair(
        &[acct("a1", Some("two@example.com"), true)],
        &users,
        &Pairings::default(),
    );
    assert!(r.pairs.is_empty());
    assert_eq!(reason(&r, &u("c1")), Some(ConflictReason::SeveralEmails));
    assert_eq!(reason(&r, &a("a1")), Some(ConflictReason::MatchUnavailable));
    // The same email twice, in two spellings, is one email.
    let same = [user(
        "c1",
        &[("two@example.com", true), ("TWO@example.com", true)],
    )];
    let r = pair(
        &[acct("a1", Some("two@example.com"), true)],
        &same,
        &Pairings::default(),
    );
    assert_eq!(r.pairs, vec![p("a1", "c1")]);
}

#[test]
fn invalid_ids_and_repeated_listings() {
    let accounts = [acct("a:1", Some("x@example.com"), true)];
    let users = [
        user("c 1", &[("y@example.com", true)]),
        user("c2", &[("z@example.com", true)]),
        user("c2", &[("z@example.com", true)]),
    ];
    let accounts2 = [acct("a2", Some("z@example.com"), true)];
    let r = pair(&accounts, &users, &Pairings::default());
    assert_eq!(reason(&r, &a("a:1")), Some(ConflictReason::InvalidId));
    assert_eq!(reason(&r, &u("c 1")), Some(ConflictReason::InvalidId));
    // c2 listed twice (a page boundary moved) counts once.
    let r = pair(&accounts2, &users, &Pairings::default());
    assert_eq!(r.pairs, vec![p("a2", "c2")]);
}

#[test]
fn an_email_change_after_pairing_does_not_re_pair() {
    let mut state = Pairings::default();
    let r = state.auto_pair(
        &[acct("a1", Some("dan@example.com"), true)],
        &[user("c1", &[("dan@example.com", true)])],
    );
    assert_eq!(r.added, vec![p("a1", "c1")]);
    // Later: a1's email changes to erin@, c1's to zed@, and a new cloud user c2 has erin@.
    let accounts = [
        acct("a1", Some("erin@example.com"), true),
        acct("a3", Some("zed@example.com"), true),
    ];
    let users = [
        user("c1", &[("zed@example.com", true)]),
        user("c2", &[("erin@example.com", true)]),
    ];
    let r = state.auto_pair(&accounts, &users);
    assert_eq!(state.pairs, vec![p("a1", "c1")]);
    assert!(r.added.is_empty());
    assert_eq!(
        reason(&r, &a("a1")),
        None,
        "paired members are not re-considered"
    );
    assert_eq!(reason(&r, &u("c1")), None);
    assert_eq!(reason(&r, &u("c2")), Some(ConflictReason::MatchUnavailable));
    assert_eq!(reason(&r, &a("a3")), Some(ConflictReason::MatchUnavailable));
}

#[test]
fn only_the_admin_pairs_and_unpairs_and_an_unpaired_account_is_held() {
    let accounts = [acct("a1", Some("fay@example.com"), true)];
    let users = [
        user("c1", &[("fay@example.com", true)]),
        user("c9", &[("other@example.com", true)]),
    ];
    let mut s = Pairings::default();
    s.auto_pair(&accounts, &users);
    assert_eq!(s.admin_unpair("a1", "a1"), Err(PairError::NotAdmin));
    assert_eq!(s.admin_unpair(ADMIN, "a1"), Ok(p("a1", "c1")));
    assert_eq!(s.admin_unpair(ADMIN, "a1"), Err(PairError::NotPaired));
    // Held: automatic pairing does not pair it again, and says why.
    let r = s.auto_pair(&accounts, &users);
    assert!(s.pairs.is_empty());
    assert_eq!(reason(&r, &a("a1")), Some(ConflictReason::HeldByAdmin));
    assert_eq!(reason(&r, &u("c1")), Some(ConflictReason::MatchUnavailable));
    // The admin pairs it by hand, with any cloud user.
    assert_eq!(s.admin_pair("bob", "a1", "c9"), Err(PairError::NotAdmin));
    assert_eq!(s.admin_pair(ADMIN, "a1", "c:9"), Err(PairError::InvalidId));
    assert_eq!(s.admin_pair(ADMIN, "a1", "c9"), Ok(p("a1", "c9")));
    assert!(s.held.is_empty());
    assert_eq!(
        s.admin_pair(ADMIN, "a1", "c1"),
        Err(PairError::AccountPaired)
    );
    assert_eq!(
        s.admin_pair(ADMIN, "a2", "c9"),
        Err(PairError::CloudUserPaired)
    );
    assert_eq!(s.account_of("c9"), Some("a1"));
    assert_eq!(s.cloud_user_of("a1"), Some("c9"));
    assert_eq!(s.remove_account("a1"), Some(p("a1", "c9")));
    assert!(s.pairs.is_empty());
}

#[test]
fn scim_pages_use_the_rfc_names_and_chain() {
    let json = r#"{
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:ListResponse"],
        "totalResults": 3, "startIndex": 1, "itemsPerPage": 2,
        "Resources": [
            {"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "id": "c1",
             "userName": "gus", "displayName": "Gus",
             "emails": [{"value": "gus@example.com", "verified": true, "primary": true}]},
            {"id": "c2", "emails": [{"value": "hal@example.com", "type": "work"}]}
        ]}"#;
    let page: ScimListResponse = serde_json::from_str(json).unwrap();
    assert_eq!(page.total_results, 3);
    assert_eq!(page.resources[0].display_name, "Gus");
    assert!(page.resources[0].emails[0].verified);
    assert!(
        !page.resources[1].emails[0].verified,
        "absent means unverified"
    );
    assert_eq!(page.next_start_index(), Some(3));
    let out = serde_json::to_value(&page).unwrap();
    assert!(out.get("Resources").is_some() && out.get("itemsPerPage").is_some());
    assert!(out["Resources"][0].get("displayName").is_some());
    let last = ScimListResponse {
        start_index: 3,
        items_per_page: 1,
        resources: vec![user("c3", &[])],
        ..page.clone()
    };
    assert_eq!(last.next_start_index(), None);
    let empty = ScimListResponse {
        resources: Vec::new(),
        ..page.clone()
    };
    assert_eq!(empty.next_start_index(), None);
    assert_eq!(
        ScimListResponse::path(3, MAX_SCIM_PAGE),
        "/scim/v2/Users?startIndex=3&count=100"
    );
    // The same type crosses the tunnel as postcard.
    let bytes = postcard::to_allocvec(&page).unwrap();
    assert_eq!(
        postcard::from_bytes::<ScimListResponse>(&bytes).unwrap(),
        page
    );
    let _: String = SCIM_LIST_RESPONSE_SCHEMA.to_string();
}
