//! The durability check at start (docs/SCALE-OUT.md §14): single-node
//! Courier acknowledges a send only after fsync, so a node refuses a
//! cluster whose servers acknowledge before their file store syncs.
//!
//! A server's sync setting is visible only to the system account: the
//! `$SYS.REQ.SERVER.PING.JSZ` request, which every server answers with
//! its JetStream config (`config.sync_always`, present and `true` only
//! with `sync_interval: always`; `config.sync_interval` in nanoseconds)
//! and its view of the meta group (`meta_cluster.cluster_size`). The
//! account Courier's objects live in sees neither: its `$JS.API.INFO`
//! carries limits and usage only, and it gets no answer on `$SYS`
//! subjects.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use futures_util::StreamExt as _;
use serde::Deserialize;

/// Every server's answer to one ping is awaited at most this long.
pub const SURVEY_DEADLINE: Duration = Duration::from_secs(2);
/// A server that is starting, or busy on a loaded machine, may miss one
/// ping: the check pings this many times before it calls a server silent.
pub const SURVEY_ATTEMPTS: u32 = 4;
/// The pause between pings while some server stays silent.
const SURVEY_PAUSE: Duration = Duration::from_millis(500);
/// The request every server of the system account answers.
pub const JSZ_PING_SUBJECT: &str = "$SYS.REQ.SERVER.PING.JSZ";
/// Fewer JetStream servers cannot keep three replicas.
pub const SERVERS_MIN: usize = 3;

/// One server's JetStream sync setting, as it answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerSync {
    pub server: String,
    /// `sync_interval: always`: fsync before every acknowledgement.
    pub sync_always: bool,
    /// The background fsync period otherwise (2 minutes by default).
    pub sync_interval: Duration,
}

/// The servers' answers to one JSZ ping.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Survey {
    /// Servers with JetStream enabled that answered.
    pub servers: Vec<ServerSync>,
    /// The meta group's size, as the answers report it (their largest).
    pub cluster_size: usize,
    /// Every server named by an answer (the answering ones and their meta
    /// group peers): those not in `servers` did not answer.
    pub known: BTreeSet<String>,
    /// The meta group's leader, if an answer named one.
    pub meta_leader: Option<String>,
}

/// Why the cluster is weaker than single-node Courier, or cannot be
/// shown not to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finding {
    /// No system-account connection was given.
    Unchecked,
    /// The ping got no answer: the credentials are not the system account's.
    NoAnswer,
    /// A server acknowledges before its file store syncs.
    LazySync { server: String, interval: Duration },
    /// Servers of the meta group that did not answer in time.
    Unanswered {
        servers: Vec<String>,
        missing: usize,
    },
    /// The cluster has fewer JetStream servers than three replicas need.
    TooFewServers { size: usize },
}

const FIX_SYNC: &str = "set jetstream { sync_interval: always } on every server";
const OR_ACCEPT: &str = "or pass --accept-weaker-durability";

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::Unchecked => write!(
                f,
                "the servers' sync setting cannot be checked without the system account: give --nats-system-user and --nats-system-password-file (or --nats-system-creds), {OR_ACCEPT}"
            ),
            Finding::NoAnswer => write!(
                f,
                "no NATS server answered {JSZ_PING_SUBJECT} within {} s: the system credentials given are not the system account's (system_account in the servers' config); give those, {OR_ACCEPT}",
                SURVEY_DEADLINE.as_secs()
            ),
            Finding::LazySync { server, interval } => write!(
                f,
                "nats-server {server} syncs every {}, not before acknowledging: {FIX_SYNC}, {OR_ACCEPT}",
                go_duration(*interval)
            ),
            Finding::Unanswered { servers, missing } => {
                if servers.is_empty() {
                    write!(f, "{missing} server(s) of the JetStream cluster did not answer")?;
                } else {
                    write!(f, "nats-server {} did not answer", servers.join(", "))?;
                }
                write!(
                    f,
                    " {SURVEY_ATTEMPTS} pings of {} s each, so its sync setting is unknown: start the node when every server runs, {OR_ACCEPT}",
                    SURVEY_DEADLINE.as_secs()
                )
            }
            Finding::TooFewServers { size } => write!(
                f,
                "the JetStream cluster has {size} server(s); three replicas need at least {SERVERS_MIN} (docs/SCALE-OUT.md §19 starts three), {OR_ACCEPT}"
            ),
        }
    }
}

/// The check's outcome when the node may start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Durability {
    /// Every server syncs before acknowledging.
    AsSingleNode,
    /// Started with `--accept-weaker-durability` despite these.
    Weaker(Vec<Finding>),
}

#[derive(Debug, thiserror::Error)]
pub enum DurabilityError {
    #[error("refusing a backend weaker than single-node Courier (it acknowledges a send only after fsync):\n  {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  "))]
    Weaker(Vec<Finding>),
    #[error("cannot ask the NATS servers for their JetStream config: {0}")]
    Request(String),
}

/// Asks every server for its JetStream config (`system` is a connection
/// as the system account) and collects the answers until as many came as
/// the meta group has members, or `deadline` passed.
pub async fn survey(
    system: &async_nats::Client,
    deadline: Duration,
) -> Result<Survey, DurabilityError> {
    let inbox = system.new_inbox();
    let mut answers = system
        .subscribe(inbox.clone())
        .await
        .map_err(|e| DurabilityError::Request(e.to_string()))?;
    system
        .publish_with_reply(JSZ_PING_SUBJECT, inbox, bytes::Bytes::new())
        .await
        .map_err(|e| DurabilityError::Request(e.to_string()))?;
    system
        .flush()
        .await
        .map_err(|e| DurabilityError::Request(e.to_string()))?;
    let mut survey = Survey::default();
    let mut answered = 0usize;
    let until = tokio::time::Instant::now() + deadline;
    while answered == 0 || answered < survey.cluster_size {
        let Ok(Some(message)) = tokio::time::timeout_at(until, answers.next()).await else {
            break;
        };
        answered += 1;
        match serde_json::from_slice::<JszAnswer>(&message.payload) {
            Ok(answer) => survey.add(answer),
            Err(e) => tracing::warn!("an unreadable answer to {JSZ_PING_SUBJECT}: {e}"),
        }
    }
    if answered == 0 && system.connection_state() != async_nats::connection::State::Connected {
        return Err(DurabilityError::Request(
            "the connection to NATS was lost during the check; start again once a server is reachable".into(),
        ));
    }
    Ok(survey)
}

/// What keeps `survey` from vouching for fsync before acknowledgement.
pub fn assess(survey: &Survey) -> Vec<Finding> {
    if survey.servers.is_empty() && survey.known.is_empty() {
        return vec![Finding::NoAnswer];
    }
    let mut findings: Vec<Finding> = survey
        .servers
        .iter()
        .filter(|s| !s.sync_always)
        .map(|s| Finding::LazySync {
            server: s.server.clone(),
            interval: s.sync_interval,
        })
        .collect();
    let answered: BTreeSet<&String> = survey.servers.iter().map(|s| &s.server).collect();
    let silent: Vec<String> = survey
        .known
        .iter()
        .filter(|name| !answered.contains(name))
        .cloned()
        .collect();
    let missing = survey
        .cluster_size
        .saturating_sub(survey.servers.len())
        .max(silent.len());
    if missing > 0 {
        findings.push(Finding::Unanswered {
            servers: silent,
            missing,
        });
    }
    let size = survey.cluster_size.max(survey.servers.len());
    if size < SERVERS_MIN {
        findings.push(Finding::TooFewServers { size });
    }
    findings
}

/// The node may start when nothing was found, or when the operator
/// accepted weaker durability (the findings are then logged at warn).
pub fn decide(findings: Vec<Finding>, accept_weaker: bool) -> Result<Durability, DurabilityError> {
    if findings.is_empty() {
        return Ok(Durability::AsSingleNode);
    }
    if !accept_weaker {
        return Err(DurabilityError::Weaker(findings));
    }
    for finding in &findings {
        tracing::warn!("--accept-weaker-durability: {finding}");
    }
    Ok(Durability::Weaker(findings))
}

/// The whole check: survey (when a system-account connection is given),
/// assess, decide.
pub async fn check(
    system: Option<&async_nats::Client>,
    accept_weaker: bool,
) -> Result<Durability, DurabilityError> {
    let findings = match system {
        Some(system) => survey_until_all_answer(system).await?,
        None => vec![Finding::Unchecked],
    };
    decide(findings, accept_weaker)
}

/// Surveys again, up to `SURVEY_ATTEMPTS` times, while servers of the
/// meta group stay silent: a silence is the one finding time can change.
async fn survey_until_all_answer(
    system: &async_nats::Client,
) -> Result<Vec<Finding>, DurabilityError> {
    let mut attempt = 1;
    loop {
        let findings = assess(&survey(system, SURVEY_DEADLINE).await?);
        let silent = findings.iter().find_map(|f| match f {
            Finding::Unanswered { missing, .. } => Some(*missing),
            _ => None,
        });
        match silent {
            Some(missing) if attempt < SURVEY_ATTEMPTS => {
                tracing::info!(
                    "durability check: {missing} server(s) silent on ping {attempt} of {SURVEY_ATTEMPTS}; asking again"
                );
                attempt += 1;
                tokio::time::sleep(SURVEY_PAUSE).await;
            }
            _ => return Ok(findings),
        }
    }
}

/// A JSZ answer's parts the check reads.
#[derive(Deserialize)]
struct JszAnswer {
    server: AnswerServer,
    #[serde(default)]
    data: Option<JszData>,
}

#[derive(Deserialize)]
struct AnswerServer {
    name: String,
}

#[derive(Deserialize)]
struct JszData {
    /// Absent when the server runs without JetStream.
    #[serde(default)]
    config: Option<JszConfig>,
    #[serde(default)]
    meta_cluster: Option<MetaCluster>,
}

#[derive(Deserialize)]
struct JszConfig {
    #[serde(default)]
    sync_interval: u64,
    #[serde(default)]
    sync_always: bool,
}

#[derive(Deserialize)]
struct MetaCluster {
    #[serde(default)]
    cluster_size: usize,
    #[serde(default)]
    leader: Option<String>,
    #[serde(default)]
    replicas: Vec<MetaPeer>,
}

#[derive(Deserialize)]
struct MetaPeer {
    name: String,
}

impl Survey {
    fn add(&mut self, answer: JszAnswer) {
        let Some(data) = answer.data else {
            return;
        };
        let Some(config) = data.config else {
            return;
        };
        self.known.insert(answer.server.name.clone());
        match data.meta_cluster {
            Some(meta) => {
                self.cluster_size = self.cluster_size.max(meta.cluster_size);
                if let Some(leader) = meta.leader.filter(|l| !l.is_empty()) {
                    self.meta_leader = Some(leader);
                }
                self.known.extend(meta.replicas.into_iter().map(|p| p.name));
            }
            // A server outside any cluster is a cluster of one.
            None => self.cluster_size = self.cluster_size.max(1),
        }
        self.servers.push(ServerSync {
            server: answer.server.name,
            sync_always: config.sync_always,
            sync_interval: Duration::from_nanos(config.sync_interval),
        });
    }
}

/// Go's `time.Duration` text, as nats-server writes it: `2m0s`, `1h0m0s`,
/// `30s`, `1.5s`.
fn go_duration(d: Duration) -> String {
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let frac = d.subsec_nanos();
    let seconds = if frac == 0 {
        format!("{s}s")
    } else {
        let text = format!("{s}.{frac:09}");
        format!("{}s", text.trim_end_matches('0'))
    };
    if h > 0 {
        format!("{h}h{m}m{seconds}")
    } else if m > 0 {
        format!("{m}m{seconds}")
    } else {
        seconds
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails, which is its point
mod tests {
    use super::*;

    /// An answer as nats-server 2.15.1 sends it (trimmed), with
    /// `sync_always` present only when set.
    fn answer(name: &str, sync_always: bool, peers: &[&str]) -> JszAnswer {
        let sync = if sync_always {
            r#","sync_always":true"#
        } else {
            ""
        };
        let replicas: Vec<String> = peers
            .iter()
            .map(|p| format!(r#"{{"name":"{p}","current":true}}"#))
            .collect();
        let text = format!(
            r#"{{"server":{{"name":"{name}","host":"0.0.0.0","id":"N","ver":"2.15.1"}},
               "data":{{"server_id":"N","config":{{"max_memory":1,"store_dir":"/x","sync_interval":120000000000{sync},"strict":true}},
               "meta_cluster":{{"name":"courier","leader":"n1","cluster_size":3,"replicas":[{}]}}}}}}"#,
            replicas.join(",")
        );
        serde_json::from_str(&text).unwrap()
    }

    fn survey_of(answers: Vec<JszAnswer>) -> Survey {
        let mut survey = Survey::default();
        for a in answers {
            survey.add(a);
        }
        survey
    }

    #[test]
    fn three_servers_syncing_always_pass() {
        let s = survey_of(vec![
            answer("n1", true, &["n2", "n3"]),
            answer("n2", true, &["n1", "n3"]),
            answer("n3", true, &["n1", "n2"]),
        ]);
        assert_eq!(s.cluster_size, 3);
        assert_eq!(s.meta_leader.as_deref(), Some("n1"));
        assert_eq!(assess(&s), []);
        assert_eq!(decide(assess(&s), false).unwrap(), Durability::AsSingleNode);
    }

    #[test]
    fn a_lazy_server_is_named_with_the_fix() {
        let s = survey_of(vec![
            answer("n1", true, &["n2", "n3"]),
            answer("n2", false, &["n1", "n3"]),
            answer("n3", true, &["n1", "n2"]),
        ]);
        let findings = assess(&s);
        assert_eq!(
            findings,
            [Finding::LazySync {
                server: "n2".into(),
                interval: Duration::from_secs(120)
            }]
        );
        assert_eq!(
            findings[0].to_string(),
            "nats-server n2 syncs every 2m0s, not before acknowledging: set jetstream { sync_interval: always } on every server, or pass --accept-weaker-durability"
        );
        let refused = decide(findings.clone(), false).unwrap_err();
        assert!(refused
            .to_string()
            .contains("nats-server n2 syncs every 2m0s"));
        assert_eq!(
            decide(findings.clone(), true).unwrap(),
            Durability::Weaker(findings)
        );
    }

    #[test]
    fn a_silent_server_cannot_be_vouched_for() {
        let s = survey_of(vec![
            answer("n1", true, &["n2", "n3"]),
            answer("n2", true, &["n1", "n3"]),
        ]);
        assert_eq!(
            assess(&s),
            [Finding::Unanswered {
                servers: vec!["n3".into()],
                missing: 1
            }]
        );
        assert_eq!(assess(&Survey::default()), [Finding::NoAnswer]);
    }

    #[test]
    fn a_lone_server_is_too_few() {
        let lone: JszAnswer = serde_json::from_str(
            r#"{"server":{"name":"solo"},"data":{"config":{"sync_interval":120000000000,"sync_always":true}}}"#,
        )
        .unwrap();
        assert_eq!(
            assess(&survey_of(vec![lone])),
            [Finding::TooFewServers { size: 1 }]
        );
    }

    #[test]
    fn a_server_without_jetstream_holds_nothing_and_is_skipped() {
        let bare: JszAnswer =
            serde_json::from_str(r#"{"server":{"name":"edge"},"data":{"server_id":"N"}}"#).unwrap();
        let s = survey_of(vec![bare]);
        assert!(s.servers.is_empty() && s.known.is_empty());
    }

    #[test]
    fn durations_read_as_the_server_writes_them() {
        assert_eq!(go_duration(Duration::from_secs(120)), "2m0s");
        assert_eq!(go_duration(Duration::from_secs(3600)), "1h0m0s");
        assert_eq!(go_duration(Duration::from_secs(30)), "30s");
        assert_eq!(go_duration(Duration::from_millis(1500)), "1.5s");
    }
}
