//! `courier serve --backend nats://…`: joining a NATS JetStream cluster
//! as one stateless node (docs/SCALE-OUT.md §14, §15): connect, check
//! that the servers sync before they acknowledge, create or check every
//! stream and bucket, and hand the server the cluster's store.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use courier_cluster::{durability, nodes::NodeRecord, Auth, Backend, NodeId};

use crate::serve::ServeArgs;

/// Flags of a node on a cluster backend; meaningless without `--backend`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct ClusterArgs {
    /// The NATS user Courier's streams and buckets live under.
    #[arg(long, requires = "nats_password_file", conflicts_with = "nats_creds")]
    pub(crate) nats_user: Option<String>,
    /// A file holding --nats-user's password (never on the command line).
    #[arg(long, requires = "nats_user")]
    pub(crate) nats_password_file: Option<PathBuf>,
    /// A NATS credentials file (a user JWT and its nkey seed, as `nsc
    /// generate creds` writes it) for the account Courier's streams and
    /// buckets live in, where an operator's JWTs define the accounts.
    #[arg(long, value_name = "FILE")]
    pub(crate) nats_creds: Option<PathBuf>,
    /// A user of the NATS system account: the node asks every server
    /// whether it syncs before acknowledging (`sync_interval: always`).
    #[arg(
        long,
        requires = "nats_system_password_file",
        conflicts_with = "nats_system_creds"
    )]
    pub(crate) nats_system_user: Option<String>,
    /// A file holding --nats-system-user's password.
    #[arg(long, requires = "nats_system_user")]
    pub(crate) nats_system_password_file: Option<PathBuf>,
    /// A credentials file of a user of the NATS system account, for the
    /// same check as --nats-system-user.
    #[arg(long, value_name = "FILE")]
    pub(crate) nats_system_creds: Option<PathBuf>,
    /// Start even when the servers acknowledge before they sync, or cannot
    /// be asked: acknowledged sends may then be lost when machines crash
    /// (docs/SCALE-OUT.md §14 cites the Jepsen findings).
    #[arg(long)]
    pub(crate) accept_weaker_durability: bool,
    /// This node's name in the cluster (default: hostname and 8 random
    /// hex digits, new at every start).
    #[arg(long)]
    pub(crate) node_id: Option<String>,
    /// How many deliveries each service's consumer may have unacknowledged
    /// across every node (JetStream's `max_ack_pending`): keep it above
    /// the sum of the service's instances' max_in_flight, or deliveries
    /// stop at it. Applied to a consumer when its service next subscribes.
    #[arg(long, default_value_t = courier_cluster::consumers::MAX_ACK_PENDING_DEFAULT,
          value_parser = clap::value_parser!(i64).range(1..))]
    pub(crate) nats_max_ack_pending: i64,
}

/// What joining gives the server.
pub(crate) struct Joined {
    pub(crate) store: Box<dyn courier_store::MessageStore>,
    pub(crate) node: Arc<courier_server::ClusterNode>,
}

fn read_password(path: &PathBuf, flag: &str) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {flag} {}", path.display()))?;
    Ok(text.trim_end_matches(['\n', '\r']).to_string())
}

/// How a connection logs in: a user and its password file (named
/// `password_flag` in errors), or a credentials file (`creds_flag`).
struct Login<'a> {
    user: &'a Option<String>,
    password: &'a Option<PathBuf>,
    password_flag: &'a str,
    creds: &'a Option<PathBuf>,
    creds_flag: &'a str,
}

impl Login<'_> {
    fn given(&self) -> bool {
        self.user.is_some() || self.creds.is_some()
    }

    fn auth(&self) -> anyhow::Result<Auth> {
        if let Some(path) = self.creds {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {} {}", self.creds_flag, path.display()))?;
            return Auth::credentials(text)
                .with_context(|| format!("{} {}", self.creds_flag, path.display()));
        }
        Ok(match (self.user, self.password) {
            (Some(user), Some(path)) => Auth::UserPassword {
                user: user.clone(),
                password: read_password(path, self.password_flag)?,
            },
            _ => Auth::None,
        })
    }
}

pub(crate) async fn join(args: &ServeArgs) -> anyhow::Result<Joined> {
    let cluster = &args.cluster;
    let backend = Backend::parse(&args.backend)?;
    let node = match &cluster.node_id {
        Some(id) => NodeId::new(id)?,
        None => NodeId::generate(),
    };
    let login = Login {
        user: &cluster.nats_user,
        password: &cluster.nats_password_file,
        password_flag: "--nats-password-file",
        creds: &cluster.nats_creds,
        creds_flag: "--nats-creds",
    };
    let connection = courier_cluster::connect(
        &backend,
        &login.auth()?,
        &format!("courier node {}", node.as_str()),
    )
    .await?;
    let system_login = Login {
        user: &cluster.nats_system_user,
        password: &cluster.nats_system_password_file,
        password_flag: "--nats-system-password-file",
        creds: &cluster.nats_system_creds,
        creds_flag: "--nats-system-creds",
    };
    let system = if system_login.given() {
        let system = courier_cluster::connect(
            &backend,
            &system_login.auth()?,
            &format!("courier node {} (checks)", node.as_str()),
        )
        .await
        .context(
            "cannot connect as the NATS system user (--nats-system-user or --nats-system-creds)",
        )?;
        Some(system.client)
    } else {
        None
    };
    let durability_weaker =
        match durability::check(system.as_ref(), cluster.accept_weaker_durability).await? {
            durability::Durability::AsSingleNode => {
                tracing::info!("every NATS server syncs before it acknowledges");
                false
            }
            durability::Durability::Weaker(findings) => {
                for finding in findings {
                    tracing::warn!("weaker durability accepted: {finding}");
                }
                true
            }
        };
    let settings = courier_cluster::Settings {
        dedup_window: std::time::Duration::from_millis(
            courier_server::BrokerConfig::default().dedup_window_ms,
        ),
        max_message_bytes: i32::try_from(courier_proto::FRAME_BYTES_MAX_DEFAULT)
            .unwrap_or(i32::MAX),
        retention_bytes: args
            .retention_bytes
            .map(|b| i64::try_from(b).unwrap_or(i64::MAX)),
        ..courier_cluster::Settings::default()
    };
    let provisioned = courier_cluster::provision(&connection, &settings).await?;
    for difference in &provisioned.differences {
        tracing::warn!("the cluster's setting is used: {difference}");
    }
    let store = courier_cluster::store::ClusterStore::new(
        connection.clone(),
        tokio::runtime::Handle::current(),
        node.clone(),
        &provisioned,
        courier_cluster::store::StoreOptions {
            max_ack_pending: cluster.nats_max_ack_pending,
            ..courier_cluster::store::StoreOptions::default()
        },
    );
    let record = NodeRecord::starting_now(
        args.listen.to_string(),
        args.http.addr().map(|a| a.to_string()),
    );
    let in_progress = store.in_progress();
    let given_back = store.given_back();
    let services = store.service_writer();
    Ok(Joined {
        store: Box::new(store),
        node: Arc::new(courier_server::ClusterNode {
            in_progress,
            given_back,
            services,
            held_leases: Default::default(),
            connection,
            node,
            nodes: provisioned.nodes.clone(),
            leases: provisioned.leases.clone(),
            registry: provisioned.registry.clone(),
            record,
            durability_weaker,
            event_retention: args
                .retain
                .iter()
                .map(|rule| std::time::Duration::from_millis(rule.max_age_ms))
                .fold(args.retention, std::cmp::Ord::max),
        }),
    })
}
