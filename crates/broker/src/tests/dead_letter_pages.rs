//! `courier.dead-letters.list` answers a page by id: a bounded number of
//! messages read per answer, however many dead letters there are.

use super::*;
use serde_json::json;

fn ask(h: &mut Harness, seq: u64, args: serde_json::Value) -> Vec<serde_json::Value> {
    h.send(
        1,
        seq,
        Message::new(Kind::Command, "courier.dead-letters.list", args.to_string()),
    );
    h.actions()
        .into_iter()
        .find_map(|a| match a {
            Action::Deliver { message, .. } => {
                serde_json::from_slice::<serde_json::Value>(&message.payload).ok()
            }
            _ => None,
        })
        .and_then(|v| v.as_array().cloned())
        .expect("a JSON list")
}

#[test]
fn dead_letters_are_listed_a_page_at_a_time_by_id() {
    let mut h = Harness::new();
    h.connect(1, "web", 0);
    h.connect(2, "recv", 0);
    h.broker
        .subscribe(2, 0, "job.run", 0, 1, StartFrom::New, h.now);
    for i in 0..250 {
        h.send(1, i, command("job.run", "x"));
    }
    // Dead-lettered newest first: the listing still goes by id.
    let mut deliveries = h.deliveries();
    deliveries.reverse();
    for (_, delivery, ..) in deliveries {
        h.broker.nack(2, delivery, 0, h.now);
    }
    h.actions();
    assert_eq!(h.broker.dead_letter_count("recv"), Some(250));

    let mut ids: Vec<u64> = Vec::new();
    let mut after = serde_json::Value::Null;
    let mut pages = 0;
    loop {
        pages += 1;
        let page = ask(
            &mut h,
            1000 + pages,
            json!({"service": "recv", "after": after}),
        );
        let letters: Vec<u64> = page.iter().filter_map(|l| l["id"].as_u64()).collect();
        ids.extend(&letters);
        match page.last().filter(|l| l["truncated"] == true) {
            Some(note) => {
                assert_eq!(letters.len(), DEAD_LETTERS_PAGE_DEFAULT, "{note}");
                assert_eq!(note["rest_after"], json!(letters.last()));
                assert_eq!(note["total"], json!(250 - ids.len() + letters.len()));
                after = note["rest_after"].clone();
            }
            None => break,
        }
    }
    assert_eq!(pages, 3, "100, 100, then the last 50");
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(ids, sorted, "by id, none twice");
    assert_eq!(ids.len(), 250);

    let small = ask(
        &mut h,
        2000,
        json!({"service": "recv", "limit": 7, "after": ids[9]}),
    );
    let shown: Vec<u64> = small.iter().filter_map(|l| l["id"].as_u64()).collect();
    assert_eq!(shown, ids[10..17].to_vec());
}

#[test]
fn a_page_limit_out_of_range_is_refused_naming_the_range() {
    let mut h = Harness::new();
    h.connect(1, "web", 0);
    for (seq, limit) in [(1, json!(0)), (2, json!(1001)), (3, json!("ten"))] {
        h.send(
            1,
            seq,
            Message::new(
                Kind::Command,
                "courier.dead-letters.list",
                json!({"service": "recv", "limit": limit}).to_string(),
            ),
        );
        let (code, reason) = refusal(&h.actions(), seq);
        assert_eq!(code, ErrorCode::InvalidMessage);
        assert!(reason.contains("from 1 to 1000"), "{reason}");
    }
}
