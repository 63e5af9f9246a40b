//! Trace records: what the core did with each message it accepted, for
//! the activity traces the network edge keeps (`courier trace`).
//!
//! Observability must not cost the hot path, so the core only appends
//! compact records to a `Vec` while tracing is on — a reference count on
//! the message it already holds, the names it already shares — and the
//! network edge takes them under the lock it holds anyway
//! ([`crate::Broker::take_traces`]). Encoding, indexing, sampling and
//! disk writes all happen elsewhere, off the broker's lock.
//!
//! Deliveries that need an ack are identified by the message's store
//! `seq` (what the queues hold), not its id: the edge learns which seq is
//! which message from the `Accepted` record.

use std::collections::VecDeque;
use std::sync::Arc;

use courier_proto::{validate_pattern, ErrorCode, Message, SharedStr};
use courier_store::Seq;
use serde_json::Value;
use uuid::Uuid;

use crate::Nanos;

/// One thing the core did, in the order it did it.
#[derive(Debug, Clone, PartialEq)]
pub enum TraceRecord {
    /// The broker accepted `message` (its `timestamp` is when).
    Accepted {
        message: Arc<Message>,
        /// Its place in the store; 0 when it is not stored (transient
        /// messages, replies, events nobody receives).
        seq: Seq,
        /// The services chosen to receive it (a reply's: the requester).
        receivers: Arc<[String]>,
    },
    /// Handed to an instance of `service`.
    Delivered {
        message: Arc<Message>,
        /// 0 for deliveries that take no ack (replies, transient messages).
        seq: Seq,
        service: SharedStr,
        instance: SharedStr,
        attempt: u32,
        at: Nanos,
    },
    /// What became of a delivery that takes an ack, by the message's seq.
    Settled {
        seq: Seq,
        service: SharedStr,
        outcome: Outcome,
        at: Nanos,
    },
}

/// The end of one delivery attempt of a stored message to a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Acked,
    /// The receiver asked for a retry after `delay_ms`.
    Nacked {
        delay_ms: u32,
    },
    /// Taken back for another attempt without an answer (the ack
    /// deadline passed, the receiver disconnected).
    Released {
        reason: &'static str,
    },
    /// Given up after its last attempt; now in the service's dead letters.
    DeadLettered {
        reason: &'static str,
    },
    /// Dropped undelivered: its `expires_at` passed.
    Expired,
}

impl Outcome {
    /// The word traces show for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Acked => "acked",
            Outcome::Nacked { .. } => "nacked",
            Outcome::Released { .. } => "released",
            Outcome::DeadLettered { .. } => "dead_lettered",
            Outcome::Expired => "expired",
        }
    }
}

/// Decides which activities are traced: all of them up to `rate` accepted
/// messages a second; above it, an activity is traced if the low `level`
/// bits of a fixed hash of its id are zero (1 in 2^level). Whole
/// activities only: the level that counts for a message is the one in
/// force when its *activity* started — the millisecond in its UUID v7
/// id — so every message of an activity gets the same answer however the
/// rate moves meanwhile. Levels follow each 100 ms window's rate, and go
/// up at once when a window traces more than its share (bursts are cut
/// within the window). A level change never reaches back past an
/// activity already decided (a client clock up to 5 s ahead is allowed
/// for); an activity id that is not a UUID v7 (or far ahead) is timed by
/// the broker's clock, and is then whole only while the level holds.
///
/// Costs a hash and a look at the last level change per message: the
/// records of skipped activities are never made.
#[derive(Debug, Clone)]
pub struct TraceSampler {
    /// Accepted messages a second traced whole; 0: everything.
    rate: u32,
    window_start: Nanos,
    window_seen: u64,
    window_traced: u64,
    level: u8,
    /// (unix ms from which a level holds, the level), in time order.
    history: VecDeque<(u64, u8)>,
    /// The level before the oldest change remembered.
    level_before_history: u8,
    /// The latest activity time decided so far (unix ms).
    newest_decided_ms: u64,
    /// Accepted messages not traced.
    pub skipped: u64,
}

const SAMPLE_WINDOW_NS: Nanos = 100_000_000;
const WINDOWS_PER_SECOND: u64 = 10;
/// At most 1 in 2^`LEVEL_MAX` activities is traced.
const LEVEL_MAX: u8 = 24;
/// Level changes remembered (at most 10 a second; older activities get
/// the oldest remembered level).
const LEVEL_HISTORY_MAX: usize = 4096;
/// How far ahead of the broker's clock an activity's time is believed.
const CLOCK_AHEAD_MS_MAX: u64 = 5_000;

impl TraceSampler {
    pub fn new(rate: u32) -> TraceSampler {
        TraceSampler {
            rate,
            window_start: 0,
            window_seen: 0,
            window_traced: 0,
            level: 0,
            history: VecDeque::new(),
            level_before_history: 0,
            newest_decided_ms: 0,
            skipped: 0,
        }
    }

    /// 1 in 2^level new activities is traced now.
    pub fn level(&self) -> u8 {
        self.level
    }

    /// Counts an accepted message and says whether it is traced.
    pub fn accept(&mut self, activity: &Uuid, now: Nanos) -> bool {
        if self.rate == 0 {
            return true;
        }
        if now >= self.window_start.saturating_add(SAMPLE_WINDOW_NS) {
            let elapsed = now.saturating_sub(self.window_start).max(SAMPLE_WINDOW_NS);
            let per_second = self.window_seen.saturating_mul(1_000_000_000) / elapsed;
            let mut level = 0;
            while level < LEVEL_MAX && (per_second >> level) > u64::from(self.rate) {
                level += 1;
            }
            self.set_level(level, now);
            self.window_start = now;
            self.window_seen = 0;
            self.window_traced = 0;
        }
        self.window_seen += 1;
        let ms = activity_ms(activity, now);
        self.newest_decided_ms = self.newest_decided_ms.max(ms);
        if !keeps(activity, self.level_at(ms)) {
            self.skipped += 1;
            return false;
        }
        self.window_traced += 1;
        let budget = (u64::from(self.rate) / WINDOWS_PER_SECOND).max(1);
        if self.window_traced > budget && self.level < LEVEL_MAX {
            // A burst: new activities from now on are sampled harder.
            self.set_level(self.level + 1, now);
            self.window_traced = 0;
        }
        true
    }

    /// Whether a later record of `activity` (a delivery, an outcome) is
    /// traced: the answer its accepted messages got.
    pub fn traces(&self, activity: &Uuid, now: Nanos) -> bool {
        self.rate == 0 || keeps(activity, self.level_at(activity_ms(activity, now)))
    }

    fn level_at(&self, ms: u64) -> u8 {
        // Most messages belong to activities begun since the last change.
        match self.history.back() {
            None => return self.level,
            Some(&(from, level)) if from <= ms => return level,
            Some(_) => {}
        }
        let after = self.history.partition_point(|&(from, _)| from <= ms);
        match after.checked_sub(1) {
            Some(i) => self.history[i].1,
            None => self.level_before_history,
        }
    }

    /// The new level holds for activities started from now on — or after
    /// the newest already decided, so none of those changes its answer.
    fn set_level(&mut self, level: u8, now: Nanos) {
        if level == self.level {
            return;
        }
        self.level = level;
        let from = (now / 1_000_000)
            .max(self.newest_decided_ms + 1)
            .max(self.history.back().map_or(0, |&(from, _)| from));
        match self.history.back_mut() {
            Some(last) if last.0 == from => last.1 = level,
            _ => self.history.push_back((from, level)),
        }
        if self.history.len() > LEVEL_HISTORY_MAX {
            if let Some((_, level)) = self.history.pop_front() {
                self.level_before_history = level;
            }
        }
    }
}

/// When an activity started (unix ms): its UUID v7's timestamp, unless it
/// has none or it is too far ahead of the broker's clock (then now).
fn activity_ms(activity: &Uuid, now: Nanos) -> u64 {
    let now_ms = now / 1_000_000;
    if activity.get_version_num() == 7 {
        let b = activity.as_bytes();
        let ms = u64::from_be_bytes([0, 0, b[0], b[1], b[2], b[3], b[4], b[5]]);
        if ms <= now_ms + CLOCK_AHEAD_MS_MAX {
            return ms;
        }
    }
    now_ms
}

fn keeps(activity: &Uuid, level: u8) -> bool {
    level == 0 || hash(activity) & ((1u64 << level) - 1) == 0
}

/// A fixed hash of an activity id (SplitMix64's finalizer over its two
/// halves): the same answer in every process.
fn hash(id: &Uuid) -> u64 {
    let (hi, lo) = id.as_u64_pair();
    let mut z = hi ^ lo.rotate_left(32) ^ 0x9e37_79b9_7f4a_7c15;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A question about the activity traces (`courier.trace.get`,
/// `courier.trace.find`), which the network edge answers: the traces live
/// there, not in the core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TraceQuery {
    /// One activity's causal tree.
    Activity(Uuid),
    /// Recent activities matching a filter, newest first.
    Activities(ActivityFilter),
}

/// Which recent activities `courier.trace.find` (and `GET /v1/activities`)
/// lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivityFilter {
    /// A name pattern the activity's first message matches (`todo.*`).
    pub name: Option<String>,
    /// A final reply's name (an outcome) the activity had, or
    /// `dead-lettered` for activities with a dead letter.
    pub outcome: Option<String>,
    /// Only activities started at or after this time (unix ns).
    pub since: Option<Nanos>,
    pub limit: usize,
}

/// The most activities one listing returns.
pub const ACTIVITIES_LIMIT_MAX: usize = 1000;
/// What a listing returns when it does not say.
pub const ACTIVITIES_LIMIT_DEFAULT: usize = 50;
/// The outcome filter that stands for "had a dead letter".
pub const DEAD_LETTERED: &str = "dead-lettered";

type Refusal = (ErrorCode, String);

impl TraceQuery {
    /// Reads `courier.trace.get`'s `{"activity_id"}`.
    pub fn activity_from_args(args: &Value) -> Result<TraceQuery, Refusal> {
        let id = args
            .get("activity_id")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                (
                    ErrorCode::InvalidMessage,
                    "courier.trace.get needs {\"activity_id\": UUID}".to_string(),
                )
            })?;
        let id = Uuid::parse_str(id).map_err(|e| {
            (
                ErrorCode::InvalidMessage,
                format!("courier.trace.get: activity_id {id:?} is not a UUID: {e}"),
            )
        })?;
        Ok(TraceQuery::Activity(id))
    }
}

impl ActivityFilter {
    /// Reads `{"name", "outcome", "since", "limit"}` (all optional).
    /// `since` is unix nanoseconds, an RFC 3339 time
    /// (`2026-12-05T10:00:00Z`), or an age (`15m`: started in the last
    /// fifteen minutes, counted back from `now`); numbers may come as
    /// strings, as they do from a URL.
    pub fn from_args(args: &Value, now: Nanos) -> Result<ActivityFilter, Refusal> {
        let bad = |what: String| {
            (
                ErrorCode::InvalidMessage,
                format!("courier.trace.find: {what}"),
            )
        };
        let text = |field: &str| -> Result<Option<String>, Refusal> {
            match args.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if s.is_empty() => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(Value::Number(n)) => Ok(Some(n.to_string())),
                Some(other) => Err(bad(format!("{field} must be a string, not {other}"))),
            }
        };
        let name = text("name")?;
        if let Some(pattern) = &name {
            validate_pattern(pattern).map_err(|e| {
                (
                    ErrorCode::InvalidPattern,
                    format!("courier.trace.find: name {pattern:?}: {e}"),
                )
            })?;
        }
        let since = match text("since")? {
            None => None,
            Some(since) => Some(parse_since(&since, now).map_err(bad)?),
        };
        // An empty limit is refused rather than taken as the default: a
        // caller who wrote `limit=` meant some number and lost it.
        let limit = match args.get("limit") {
            Some(Value::String(s)) if s.is_empty() => Some(String::new()),
            _ => text("limit")?,
        };
        let limit = match limit {
            None => ACTIVITIES_LIMIT_DEFAULT,
            Some(limit) => match limit.parse::<usize>() {
                Ok(n) if (1..=ACTIVITIES_LIMIT_MAX).contains(&n) => n,
                _ => {
                    return Err(bad(format!(
                        "limit {limit:?} is not a number from 1 to {ACTIVITIES_LIMIT_MAX}"
                    )))
                }
            },
        };
        Ok(ActivityFilter {
            name,
            outcome: text("outcome")?,
            since,
            limit,
        })
    }
}

/// Unix ns, an RFC 3339 time, or an age such as `90s`, `15m`, `2h`, `1d`.
fn parse_since(text: &str, now: Nanos) -> Result<Nanos, String> {
    if let Ok(ns) = text.parse::<u64>() {
        return Ok(ns);
    }
    if let Ok(at) = humantime::parse_rfc3339_weak(text) {
        return at
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos().min(u128::from(u64::MAX)) as u64)
            .map_err(|_| format!("since {text:?} is before 1970"));
    }
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let seconds: u64 = match (number.parse::<u64>(), unit) {
        (Ok(n), "s") => n,
        (Ok(n), "m") => n.saturating_mul(60),
        (Ok(n), "h") => n.saturating_mul(3600),
        (Ok(n), "d") => n.saturating_mul(86_400),
        _ => {
            return Err(format!(
                "since {text:?} is not unix nanoseconds, an RFC 3339 time (2026-12-05T10:00:00Z) or an age (90s, 15m, 2h, 1d)"
            ))
        }
    };
    Ok(now.saturating_sub(seconds.saturating_mul(1_000_000_000)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: Nanos = 1_800_000_000_000_000_000;

    #[test]
    fn a_filter_reads_every_form_of_since_and_bounds_its_limit() {
        let f = ActivityFilter::from_args(&json!({}), NOW).expect("empty is every activity");
        assert_eq!(f.limit, ACTIVITIES_LIMIT_DEFAULT);
        assert_eq!((f.name, f.outcome, f.since), (None, None, None));
        let f = ActivityFilter::from_args(
            &json!({"name": "todo.*", "outcome": "todo.created", "since": "15m", "limit": "3"}),
            NOW,
        )
        .expect("valid");
        assert_eq!(f.since, Some(NOW - 15 * 60 * 1_000_000_000));
        assert_eq!((f.name.as_deref(), f.limit), (Some("todo.*"), 3));
        let f = ActivityFilter::from_args(&json!({"since": 42}), NOW).expect("ns");
        assert_eq!(f.since, Some(42));
        let f = ActivityFilter::from_args(&json!({"since": "1970-01-01T00:00:01Z"}), NOW)
            .expect("rfc 3339");
        assert_eq!(f.since, Some(1_000_000_000));
        for bad in [
            json!({"since": "yesterday"}),
            json!({"limit": 0}),
            json!({"limit": ""}),
            json!({"limit": 1001}),
            json!({"name": "Not A Pattern"}),
            json!({"outcome": ["a"]}),
        ] {
            let refused = ActivityFilter::from_args(&bad, NOW);
            assert!(refused.is_err(), "{bad} must be refused");
        }
    }

    const MS: Nanos = 1_000_000;

    /// A UUID v7 of an activity started at `ms` (unix), random bits from `n`.
    fn activity_at(ms: u64, n: u64) -> Uuid {
        let mut bytes = [0u8; 16];
        bytes[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
        bytes[8..].copy_from_slice(&n.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_be_bytes());
        bytes[6] = 0x70 | (bytes[6] & 0x0f);
        bytes[8] = 0x80 | (bytes[8] & 0x3f);
        Uuid::from_bytes(bytes)
    }

    #[test]
    fn under_the_rate_everything_is_traced() {
        let mut s = TraceSampler::new(1_000);
        let start = 1_700_000_000_000 * MS;
        // 500 a second for 3 seconds.
        for i in 0..1_500u64 {
            let now = start + i * 2 * MS;
            assert!(s.accept(&activity_at(now / MS, i), now));
        }
        assert_eq!((s.level(), s.skipped), (0, 0));
        let mut all = TraceSampler::new(0);
        assert!(all.accept(&Uuid::from_u128(1), 0));
    }

    #[test]
    fn above_the_rate_whole_activities_are_traced_whatever_the_level_does() {
        const RATE: u32 = 1_000;
        let mut s = TraceSampler::new(RATE);
        let start = 1_700_000_000_000 * MS;
        // Activities of 10 messages each, one message every 20 µs (50,000
        // a second, 50x the rate), each activity's messages spread over
        // a second while new ones keep starting — and a quiet spell in
        // the middle drops the level, then traffic raises it again.
        let mut decided: std::collections::HashMap<u64, Vec<bool>> = Default::default();
        let mut now = start;
        let mut next = 0u64;
        let mut open: VecDeque<(u64, u64, u32)> = VecDeque::new(); // (n, started ms, sent)
        for step in 0..200_000u64 {
            now += if (60_000..60_050).contains(&step) {
                200 * MS
            } else {
                20_000
            };
            if open.len() < 5_000 {
                open.push_back((next, now / MS, 0));
                next += 1;
            }
            let Some((n, started, sent)) = open.pop_front() else {
                continue;
            };
            let traced = s.accept(&activity_at(started, n), now);
            decided.entry(n).or_default().push(traced);
            if sent + 1 < 10 {
                open.push_back((n, started, sent + 1));
            }
        }
        let mut kept = 0;
        for (n, answers) in &decided {
            assert!(
                answers.iter().all(|a| *a == answers[0]),
                "activity {n} was traced in part: {answers:?}"
            );
            kept += usize::from(answers[0]);
        }
        assert!(s.level() >= 5, "50x the rate: level {}", s.level());
        let share = kept as f64 / decided.len() as f64;
        assert!(share < 0.1, "{kept} of {} activities traced", decided.len());
        assert!(kept > 0);
        let messages: usize = decided.values().map(Vec::len).sum();
        let traced: usize = decided.values().filter(|a| a[0]).map(Vec::len).sum();
        assert_eq!(
            s.skipped as usize,
            messages - traced,
            "every skipped message is counted"
        );
        // A later record of an activity gets the answer its messages got.
        for (n, answers) in decided.iter().take(100) {
            let started = open.iter().find(|o| o.0 == *n).map(|o| o.1);
            if let Some(started) = started {
                assert_eq!(s.traces(&activity_at(started, *n), now), answers[0]);
            }
        }
    }

    #[test]
    fn a_burst_raises_the_level_within_its_window() {
        let mut s = TraceSampler::new(100);
        let start = 1_700_000_000_000 * MS;
        let mut traced = 0;
        // 10,000 new activities within 50 ms: far over the 10 a window.
        for i in 0..10_000u64 {
            let now = start + i * 5_000;
            traced += usize::from(s.accept(&activity_at(now / MS, i), now));
        }
        assert!(traced < 500, "{traced} traced of 10,000 in one burst");
        assert!(s.level() > 0);
    }

    #[test]
    fn get_needs_a_uuid() {
        let id = Uuid::now_v7();
        assert_eq!(
            TraceQuery::activity_from_args(&json!({"activity_id": id.to_string()})),
            Ok(TraceQuery::Activity(id))
        );
        let refused = TraceQuery::activity_from_args(&json!({"activity_id": "nope"}));
        assert!(
            matches!(refused, Err((ErrorCode::InvalidMessage, ref r)) if r.contains("not a UUID"))
        );
        assert!(TraceQuery::activity_from_args(&json!({})).is_err());
    }
}
