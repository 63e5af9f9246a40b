use super::*;

fn keyed(seq: Seq, key: &'static str) -> Entry {
    Entry::new(seq, 0, Some(Bytes::from_static(key.as_bytes())))
}

#[test]
fn an_entry_stays_small_because_a_backlog_holds_one_per_message() {
    assert_eq!(std::mem::size_of::<Entry>(), 24);
    let e = keyed(7, "k");
    assert_eq!(e.key().map(|k| &k[..]), Some(&b"k"[..]));
    assert_eq!(Entry::new(8, 2, None).key(), None);
}

fn flight(entry: Entry, conn: u64) -> InFlight {
    InFlight {
        entry,
        conn,
        deadline: 100,
        name: 0,
        traced: false,
        bytes: 0,
    }
}

fn ready_seqs(q: &Queue) -> Vec<Seq> {
    q.ready.iter().map(|e| e.seq).collect()
}

fn waiting(q: &Queue, key: &'static str) -> usize {
    q.keys
        .get(&Bytes::from_static(key.as_bytes()))
        .map_or(0, |k| k.waiting.len())
}

#[test]
fn keyed_messages_wait_for_their_key() {
    let mut q = Queue::default();
    q.make_ready(keyed(1, "a"));
    q.make_ready(keyed(2, "a"));
    q.make_ready(keyed(3, "b"));
    assert_eq!(ready_seqs(&q), vec![1, 3]);
    let first = q.ready.pop_front().expect("1");
    assert!(q.start(10, flight(first, 1), false));
    q.make_ready(keyed(4, "a"));
    assert_eq!(waiting(&q, "a"), 2);
    let flight = q.finish(10, 200).expect("in flight");
    q.release_key(&flight.entry);
    assert_eq!(ready_seqs(&q), vec![3, 2]);
}

#[test]
fn a_pipelined_key_sends_its_next_message_before_the_first_is_acked() {
    let mut q = Queue::default();
    for seq in 1..=4 {
        q.make_ready(keyed(seq, "a"));
    }
    let one = q.ready.pop_front().expect("1");
    assert!(q.start(11, flight(one, 7), true), "first of its key");
    assert_eq!(ready_seqs(&q), vec![2], "the next is ready at once");
    let two = q.ready.pop_front().expect("2");
    assert!(!q.start(12, flight(two, 7), true));
    assert_eq!(q.in_flight.get(&12).map(|f| f.deadline), Some(NOT_ARMED));
    assert_eq!(q.key_holder(&Bytes::from_static(b"a")), Some(7));
    assert!(q.has_followers(11));
    assert!(!q.has_followers(12));
    assert_eq!(q.overdue(1_000), vec![11], "only the first has a deadline");
    let acked = q.finish(11, 500).expect("1 out");
    q.release_key(&acked.entry);
    assert_eq!(
        q.in_flight.get(&12).map(|f| f.deadline),
        Some(500),
        "armed when it became the first"
    );
    assert_eq!(ready_seqs(&q), vec![3]);
}

#[test]
fn taking_a_key_back_puts_its_messages_in_order_again() {
    let mut q = Queue::default();
    for seq in 1..=5 {
        q.make_ready(keyed(seq, "a"));
    }
    for delivery in 21..=23 {
        let entry = q.ready.pop_front().expect("ready");
        let mut entry = entry;
        entry.attempts += 1;
        q.start(delivery, flight(entry, 3), true);
    }
    assert_eq!(ready_seqs(&q), vec![4]);
    let failed = q.finish(21, 0).expect("1 out");
    let taken = q.take_back(&Bytes::from_static(b"a"), failed.entry.seq);
    assert_eq!(
        taken
            .iter()
            .map(|f| (f.entry.seq, f.entry.attempts))
            .collect::<Vec<_>>(),
        vec![(2, 0), (3, 0)],
        "taken back uncounted"
    );
    assert!(q.ready.is_empty() && q.in_flight.is_empty());
    assert_eq!(q.key_holder(&Bytes::from_static(b"a")), None);
    q.make_ready_again(failed.entry);
    assert_eq!(ready_seqs(&q), vec![1]);
    assert_eq!(q.depth(), 5);
    assert!(!q.is_empty());
    let mut order = Vec::new();
    let mut delivery = 30;
    while let Some(entry) = q.ready.pop_front() {
        order.push(entry.seq);
        delivery += 1;
        q.start(delivery, flight(entry, 4), false);
        let done = q.finish(delivery, 0).expect("out");
        q.release_key(&done.entry);
    }
    assert_eq!(order, vec![1, 2, 3, 4, 5]);
    assert!(q.keys.is_empty(), "a key with nothing left is forgotten");
}

#[test]
fn deferred_entries_come_out_in_time_order() {
    let mut q = Queue::default();
    q.defer(30, keyed(1, "x"));
    q.defer(10, keyed(2, "y"));
    q.defer(10, keyed(3, "z"));
    assert_eq!(q.next_timer(), Some(10));
    q.release_due(9);
    assert!(q.ready.is_empty());
    q.release_due(10);
    assert_eq!(
        q.ready.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![2, 3]
    );
    assert_eq!(q.next_timer(), Some(30));
}

#[test]
fn a_backlog_of_consecutive_seqs_is_one_span() {
    let mut ready = Ready::default();
    for seq in 1..=1_000_000 {
        ready.push_back(Entry::new(seq, 0, None));
    }
    assert_eq!((ready.len(), ready.spans.len()), (1_000_000, 1));
    assert_eq!(ready.remove(10).map(|e| e.seq), Some(11));
    assert_eq!(ready.spans.len(), 2, "split around the hole");
    assert_eq!(ready.get(10).map(|e| e.seq), Some(12));
    ready.push_front(Entry::new(11, 1, None));
    assert_eq!(ready.spans.len(), 3, "a retry is a span of its own");
    assert_eq!(
        ready.pop_front().map(|e| (e.seq, e.attempts)),
        Some((11, 1))
    );
}

mod model {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        PushBack {
            gap: u64,
            attempts: u32,
            keyed: bool,
        },
        PushFront {
            attempts: u32,
        },
        Run(u32),
        Get(usize),
        Remove(usize),
        /// The last removed seq again, as a first delivery (a revived
        /// dead letter): it may extend the span it was cut from.
        Reinsert,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u64..3, 0u32..2, proptest::bool::weighted(0.1))
                .prop_map(|(gap, attempts, keyed)| Op::PushBack { gap, attempts, keyed }),
            1 => (0u32..2).prop_map(|attempts| Op::PushFront { attempts }),
            1 => (0u32..50).prop_map(Op::Run),
            2 => (0usize..80).prop_map(Op::Get),
            3 => (0usize..80).prop_map(Op::Remove),
            1 => Just(Op::Reinsert),
        ]
    }

    proptest! {
        /// Spans hold exactly what a deque of entries would, in order.
        #[test]
        fn spans_agree_with_a_deque_of_entries(ops in proptest::collection::vec(op(), 1..200)) {
            let mut ready = Ready::default();
            let mut model: VecDeque<Entry> = VecDeque::new();
            let mut next: Seq = 100;
            let mut front: Seq = 99;
            let mut removed: Option<Seq> = None;
            for op in ops {
                match op {
                    Op::PushBack { gap, attempts, keyed } => {
                        next += gap;
                        let key = keyed.then(|| Bytes::from_static(b"k"));
                        let e = Entry::new(next, attempts, key);
                        next += 1;
                        ready.push_back(e.clone());
                        model.push_back(e);
                    }
                    Op::PushFront { attempts } => {
                        let e = Entry::new(front, attempts, None);
                        front -= 1;
                        ready.push_front(e.clone());
                        model.push_front(e);
                    }
                    Op::Run(count) => {
                        ready.push_back_run(next, count);
                        model.extend((0..u64::from(count)).map(|i| Entry::new(next + i, 0, None)));
                        next += u64::from(count);
                    }
                    Op::Get(index) => {
                        prop_assert_eq!(ready.get(index), model.get(index).cloned());
                    }
                    Op::Remove(index) => {
                        prop_assert_eq!(ready.get(index), model.get(index).cloned());
                        let entry = ready.remove(index);
                        prop_assert_eq!(&entry, &model.remove(index));
                        removed = entry.map(|e| e.seq).or(removed);
                    }
                    Op::Reinsert => {
                        if let Some(seq) = removed.take() {
                            ready.push_back(Entry::new(seq, 0, None));
                            model.push_back(Entry::new(seq, 0, None));
                        }
                    }
                }
                prop_assert_eq!(ready.len(), model.len());
            }
            prop_assert_eq!(ready.iter().collect::<Vec<_>>(), model.iter().cloned().collect::<Vec<_>>());
            let expanded: Vec<Entry> = ready
                .runs()
                .flat_map(|(e, count)| (0..u64::from(count)).map(move |i| {
                    let mut e = e.clone();
                    e.seq += i;
                    e
                }))
                .collect();
            prop_assert_eq!(expanded, model.into_iter().collect::<Vec<_>>());
        }
    }
}
