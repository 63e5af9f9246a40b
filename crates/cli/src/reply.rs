//! `reply`: acts as a responder, one reply or a stream per command.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use clap::Args;
use courier_client::Error as ClientError;
use tokio::sync::mpsc;

use crate::args::parse_duration;
use crate::conn::{self, Conn, Deadline, Settings};
use crate::output;

#[derive(Args)]
pub struct ReplyArgs {
    /// The command to answer, e.g. todo.create.
    pub name: String,
    /// The reply's name, e.g. todo.created. Repeat it to name a stream's
    /// replies one by one (the last name goes on for the rest).
    #[arg(long, value_name = "NAME", required_unless_present = "final_outcome")]
    pub outcome: Vec<String>,
    /// The name of a stream's final reply (e.g. file.copy.done); the others
    /// take --outcome.
    #[arg(long, value_name = "NAME")]
    pub final_outcome: Option<String>,
    /// Reply payload: text, or @FILE for a file's bytes.
    #[arg(long, value_name = "TEXT|@FILE", conflicts_with = "echo")]
    pub data: Option<String>,
    /// Reply with the command's own payload.
    #[arg(long)]
    pub echo: bool,
    /// Send N replies: N-1 marked non-final, then the final one.
    #[arg(long, default_value_t = 1)]
    pub stream: u32,
    /// Exit after answering this many commands.
    #[arg(long)]
    pub count: Option<u64>,
    /// Wait this long before replying (simulates a slow handler).
    #[arg(long, value_parser = parse_duration)]
    pub delay: Option<Duration>,
    #[command(flatten)]
    pub conn: Conn,
}

/// The name of each reply of a stream, first to final.
fn reply_names(
    outcomes: &[String],
    final_outcome: Option<&str>,
    stream: u32,
) -> anyhow::Result<Vec<String>> {
    let stream = stream.max(1) as usize;
    let named_by_outcome = stream - usize::from(final_outcome.is_some());
    if outcomes.len() > named_by_outcome {
        anyhow::bail!(
            "{} --outcome name(s) for {named_by_outcome} repl(ies) (--stream {stream}{}); give at most one --outcome per reply, or raise --stream",
            outcomes.len(),
            if final_outcome.is_some() { ", the last named by --final-outcome" } else { "" },
        );
    }
    if outcomes.is_empty() && named_by_outcome > 0 {
        anyhow::bail!(
            "--stream {stream} sends {named_by_outcome} repl(ies) before the final one; name them with --outcome"
        );
    }
    let mut names: Vec<String> = (0..named_by_outcome)
        .map(|i| outcomes[i.min(outcomes.len().saturating_sub(1))].clone())
        .collect();
    names.extend(final_outcome.map(str::to_string));
    for name in &names {
        courier_client::proto::validate_name(name)
            .with_context(|| format!("{name:?} cannot name a reply"))?;
    }
    Ok(names)
}

pub async fn reply(args: ReplyArgs) -> anyhow::Result<()> {
    let names = Arc::new(reply_names(
        &args.outcome,
        args.final_outcome.as_deref(),
        args.stream,
    )?);
    let data = match args.data.as_deref().map(|d| (d, d.strip_prefix('@'))) {
        None => Bytes::new(),
        Some((_, Some(path))) => Bytes::from(std::fs::read(path).with_context(|| {
            format!("cannot read --data @{path}; name a readable file, or pass text without the @")
        })?),
        Some((text, None)) => Bytes::from(text.to_string().into_bytes()),
    };
    let client = conn::connect(&args.conn, Settings::default(), &Deadline::after(None)).await?;
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1024);
    let (echo, delay) = (args.echo, args.delay);
    client
        .on(&args.name, move |msg| {
            let (data, names, done_tx) = (data.clone(), names.clone(), done_tx.clone());
            async move {
                if let Some(delay) = delay {
                    // A long wait is announced, so whoever watches knows the
                    // command arrived and is being held on purpose.
                    eprintln!(
                        "courier: received {} {} from {}; replying in {}",
                        msg.name(),
                        msg.message().id,
                        msg.message().sender,
                        humantime::format_duration(delay)
                    );
                    tokio::time::sleep(delay).await;
                }
                let payload = if echo { msg.payload().clone() } else { data };
                let last = names.len() - 1;
                for (i, name) in names.iter().enumerate() {
                    let builder = msg.reply_builder(name, i == last);
                    output::with_payload_bytes(builder, payload.clone())
                        .send()
                        .await?;
                }
                let _ = done_tx.send(()).await;
                Ok::<(), ClientError>(())
            }
        })
        .await?;
    eprintln!(
        "courier: replying to {} as service {} (Ctrl-C to stop)",
        args.name,
        client.service()
    );
    let mut answered = 0u64;
    loop {
        tokio::select! {
            got = done_rx.recv() => {
                if got.is_none() { break; }
                answered += 1;
                if args.count.is_some_and(|c| answered >= c) { break; }
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    client.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(outcomes: &[&str], final_outcome: Option<&str>, stream: u32) -> Vec<String> {
        let outcomes: Vec<String> = outcomes.iter().map(|s| s.to_string()).collect();
        reply_names(&outcomes, final_outcome, stream).expect("valid")
    }

    #[test]
    fn a_stream_takes_its_names_from_outcome_and_final_outcome() {
        assert_eq!(names(&["a"], None, 1), ["a"]);
        assert_eq!(names(&["p"], None, 3), ["p", "p", "p"], "as before");
        assert_eq!(names(&["p"], Some("done"), 3), ["p", "p", "done"]);
        assert_eq!(names(&["x", "y"], None, 3), ["x", "y", "y"]);
        assert_eq!(names(&[], Some("done"), 1), ["done"]);
        let too_many = reply_names(&["a".into(), "b".into()], Some("done"), 2);
        let error = format!(
            "{:#}",
            too_many.expect_err("two names for one progress reply")
        );
        assert!(error.contains("raise --stream"), "{error}");
        assert!(reply_names(&["Bad Name".into()], None, 1).is_err());
        assert!(
            reply_names(&[], Some("done"), 3).is_err(),
            "progress unnamed"
        );
    }
}
