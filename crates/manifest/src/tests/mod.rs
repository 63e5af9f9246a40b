//! Tests across the crate: parsing (good and every kind of bad, with line
//! and column), authorisation queries including bypass attempts,
//! subscription cutting (a proptest against brute force), and `check`.

use courier_proto::pattern_matches;
use proptest::prelude::*;

use crate::*;

mod authorisation;
mod check;
mod cut;
mod parse;

/// The todo application's manifest, with real hashes of the tokens `crr_web`,
/// `crr_todo` and `crr_admin`.
fn todo_manifest_text() -> String {
    format!(
        r#"[services.web]
sends = ["todos.list@1", "todo.create@1"]
receives = ["todo.created@1"]
tokens = ["{web}"]
certificates = ["CN=web"]

[services.todo]
receives = ["todos.list@1", "todo.create@1"]
sends = ["todo.created@1"]
tokens = ["{todo}"]

[admin]
tokens = ["{admin}"]
"#,
        web = hash_token("crr_web"),
        todo = hash_token("crr_todo"),
        admin = hash_token("crr_admin"),
    )
}

fn todo_manifest() -> Manifest {
    Manifest::parse(&todo_manifest_text()).expect("the todo manifest is valid")
}

fn rules(texts: &[&str]) -> Vec<NameRule> {
    texts
        .iter()
        .map(|t| NameRule::parse(t).expect("valid rule"))
        .collect()
}

fn web() -> Identity {
    Identity::Service("web".into())
}

/// Parses `text`, expecting a refusal; returns `line:column: message`.
fn refusal(text: &str) -> String {
    match Manifest::parse(text) {
        Ok(m) => panic!("accepted: {text}\n{m:?}"),
        Err(e) => e.to_string(),
    }
}

fn assert_refused(text: &str, at: &str, contains: &str) {
    let message = refusal(text);
    assert!(
        message.starts_with(&format!("{at}: ")),
        "expected {at}, got: {message}\n--- for:\n{text}"
    );
    assert!(
        message.contains(contains),
        "expected {contains:?} in: {message}"
    );
    assert!(!message.contains('\n'), "one line: {message:?}");
}
