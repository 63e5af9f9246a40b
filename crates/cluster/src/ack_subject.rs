//! The ack subject JetStream gives each message it delivers from a
//! consumer, which is also where the message is settled (`+ACK`, `-NAK`,
//! `+TERM`): `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer
//! seq>.<ts>.<pending>`, or with a domain and an account hash after
//! `$JS.ACK` (ADR-15; 11 or more tokens).

/// The most tokens after `$JS.ACK.` an ack subject is read with (ADR-15
/// has 9, and leaves room for a few more at the end).
const ACK_TOKENS_MAX: usize = 16;

/// What an ack subject says of its message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AckSubject<'a> {
    pub stream: &'a str,
    pub consumer: &'a str,
    /// Deliveries so far, this one included (1 on the first).
    pub delivered: u64,
    pub stream_seq: u64,
    pub consumer_seq: u64,
}

impl<'a> AckSubject<'a> {
    /// `None` when `subject` is not a JetStream ack subject.
    pub fn parse(subject: &'a str) -> Option<AckSubject<'a>> {
        let rest = subject.strip_prefix("$JS.ACK.")?;
        // Read for every message fetched and settled: no allocation.
        let mut tokens = [""; ACK_TOKENS_MAX];
        let mut count = 0;
        for token in rest.split('.') {
            *tokens.get_mut(count)? = token;
            count += 1;
        }
        // Without domain and account hash: stream, consumer, delivered,
        // stream seq, consumer seq, timestamp, pending (7); with them,
        // two more in front and maybe a trailing token (9 or more).
        let fields = match count {
            7 => &tokens[..7],
            n if n >= 9 => &tokens[2..n],
            _ => return None,
        };
        if fields[0].is_empty() || fields[1].is_empty() {
            return None;
        }
        Some(AckSubject {
            stream: fields[0],
            consumer: fields[1],
            delivered: fields[2].parse().ok()?,
            stream_seq: fields[3].parse().ok()?,
            consumer_seq: fields[4].parse().ok()?,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails, which is its point
mod tests {
    use super::*;

    #[test]
    fn both_forms_parse() {
        let v1 = AckSubject::parse("$JS.ACK.COURIER_MSGS.svc-todo.2.417.9.1790230470084404000.3")
            .unwrap();
        assert_eq!(
            v1,
            AckSubject {
                stream: "COURIER_MSGS",
                consumer: "svc-todo",
                delivered: 2,
                stream_seq: 417,
                consumer_seq: 9,
            }
        );
        let v2 = AckSubject::parse(
            "$JS.ACK._.ACCHASH.COURIER_MSGS.svc-todo.1.418.10.1790230470084404000.0",
        )
        .unwrap();
        assert_eq!(
            (v2.stream, v2.delivered, v2.stream_seq),
            ("COURIER_MSGS", 1, 418)
        );
        let v2_token = AckSubject::parse(
            "$JS.ACK.hub.ACCHASH.COURIER_MSGS.svc-todo.1.419.11.1790230470084404000.0.xyz",
        )
        .unwrap();
        assert_eq!(v2_token.stream_seq, 419);
    }

    #[test]
    fn other_subjects_do_not() {
        for bad in [
            "",
            "_INBOX.abc",
            "$JS.ACK.S.C.1.2.3.4",
            "$JS.ACK.S.C.x.2.3.4.5",
            "$JS.ACK.S.C.1.-2.3.4.5",
            "$JS.ACK.a.b.S.C.1.2.3",
            "$JS.ACK..C.1.2.3.4.5",
        ] {
            assert_eq!(AckSubject::parse(bad), None, "{bad}");
        }
        let endless = format!("$JS.ACK.d.h.S.C.1.2.3.4.5{}", ".x".repeat(ACK_TOKENS_MAX));
        assert_eq!(AckSubject::parse(&endless), None, "{endless}");
    }
}
