//! The control API document and the code agree: the commands table of
//! `docs/control-api.md` lists exactly `Command::NAMES`, and its error codes table exactly
//! `ErrorCode::ALL`. No KVM needed.
//!
//! A table is found by its heading (`## Commands`, `## Error codes`): the first Markdown
//! table after that heading, before the next heading. The first cell of every body row must
//! be one backticked name (`` `status` ``).

use std::collections::BTreeSet;

use duplex_vmm::api::protocol::{Command, ErrorCode};

fn doc() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/control-api.md");
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// The backticked names in the first cell of each body row of the first table under
/// `heading` (a whole line of the document).
fn first_column(doc: &str, heading: &str) -> Vec<String> {
    let mut lines = doc.lines().skip_while(|l| l.trim_end() != heading);
    assert!(
        lines.next().is_some(),
        "docs/control-api.md has no heading {heading:?}"
    );
    let section: Vec<&str> = lines.take_while(|l| !l.starts_with('#')).collect();
    let rows: Vec<&str> = section
        .iter()
        .map(|l| l.trim())
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .collect();
    assert!(
        rows.len() >= 3,
        "no table (header, separator and a row) under {heading:?}"
    );
    let separator = rows[1].chars().all(|c| matches!(c, '|' | '-' | ':' | ' '));
    assert!(
        separator,
        "under {heading:?}: the table's second line is not a separator: {:?}",
        rows[1]
    );
    rows[2..]
        .iter()
        .map(|row| {
            let cell = row
                .trim_start_matches('|')
                .split('|')
                .next()
                .unwrap_or("")
                .trim();
            let name = cell
                .strip_prefix('`')
                .and_then(|c| c.strip_suffix('`'))
                .filter(|n| !n.is_empty() && !n.contains('`'));
            match name {
                Some(n) => n.to_owned(),
                None => panic!(
                    "under {heading:?}: the first cell of this row is not one backticked name: \
                     {row:?}"
                ),
            }
        })
        .collect()
}

/// Compares what the document lists with what the code has, naming every difference.
fn compare(what: &str, in_doc: &[String], in_code: &[&str]) {
    let doc_set: BTreeSet<&str> = in_doc.iter().map(String::as_str).collect();
    let code_set: BTreeSet<&str> = in_code.iter().copied().collect();
    let mut problems = Vec::new();
    if doc_set.len() != in_doc.len() {
        let mut seen = BTreeSet::new();
        let twice: Vec<&str> = in_doc
            .iter()
            .map(String::as_str)
            .filter(|n| !seen.insert(*n))
            .collect();
        problems.push(format!("listed more than once in the doc: {twice:?}"));
    }
    let missing_in_doc: Vec<&&str> = code_set.difference(&doc_set).collect();
    if !missing_in_doc.is_empty() {
        problems.push(format!(
            "in the code but missing from docs/control-api.md: {missing_in_doc:?}"
        ));
    }
    let missing_in_code: Vec<&&str> = doc_set.difference(&code_set).collect();
    if !missing_in_code.is_empty() {
        problems.push(format!(
            "in docs/control-api.md but missing from the code: {missing_in_code:?}"
        ));
    }
    assert!(problems.is_empty(), "{what}: {}", problems.join("; "));
}

#[test]
fn the_commands_table_lists_every_command() {
    let listed = first_column(&doc(), "## Commands");
    compare("commands (Command::NAMES)", &listed, Command::NAMES);
}

#[test]
fn the_error_codes_table_lists_every_code() {
    let listed = first_column(&doc(), "## Error codes");
    let codes: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
    compare("error codes (ErrorCode::ALL)", &listed, &codes);
}

#[test]
fn the_table_reader_finds_what_is_there_and_only_that() {
    let text = "# T\n\n## Commands\n\nIntro.\n\n| command | x |\n|---|---|\n\
                | `a` | 1 |\n| `b` | 2 |\n\nAfter.\n\n| `not` | this |\n|---|---|\n| `c` | 3 |\n\
                \n## Next\n";
    assert_eq!(first_column(text, "## Commands"), ["a", "b"]);
    let r = std::panic::catch_unwind(|| first_column("## Commands\n\nno table\n", "## Commands"));
    assert!(r.is_err(), "a heading without a table is an error");
    let r = std::panic::catch_unwind(|| {
        first_column("## Commands\n|c|\n|-|\n| plain |\n", "## Commands")
    });
    assert!(r.is_err(), "a row without a backticked name is an error");
    compare("same", &["x".into(), "y".into()], &["y", "x"]);
    let r = std::panic::catch_unwind(|| compare("differs", &["x".into()], &["y"]));
    let message = r
        .err()
        .and_then(|e| e.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    assert!(
        message.contains("missing from docs/control-api.md: [\"y\"]")
            && message.contains("missing from the code: [\"x\"]"),
        "{message}"
    );
}
