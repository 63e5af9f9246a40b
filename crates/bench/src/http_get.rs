//! A plain HTTP/1.1 request against a broker's HTTP port the bench
//! started: one request, `Connection: close`, the body read to the end.
//! The `courier` binary has the same few lines for `courier metrics
//! --prometheus`; the two programs share no library crate, and these do
//! not earn one.

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Answers larger than this are refused (a metrics page is far smaller).
const BODY_BYTES_MAX: usize = 256 * 1024 * 1024;

/// `GET path` from `addr` (`HOST:PORT`); the body when the status is 200.
pub async fn get(addr: &str, path: &str, token: Option<&str>) -> anyhow::Result<String> {
    request("GET", addr, path, token, None).await
}

/// `METHOD path` with an optional JSON body; the answer's body when the
/// status is 200, else an error carrying the broker's explanation.
pub async fn request(
    method: &str,
    addr: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect(addr).await.with_context(|| {
        format!("cannot reach the broker's HTTP port at {addr}: is `courier serve` running with --http {addr}? (pass --http ADDR here if it serves elsewhere)")
    })?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let content = match body {
        Some(b) => format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ),
        None if method == "GET" => String::new(),
        None => "Content-Length: 0\r\n".to_string(),
    };
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}{content}Connection: close\r\n\r\n{}",
        body.unwrap_or("")
    );
    stream.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    (&mut stream)
        .take(BODY_BYTES_MAX as u64 + 64 * 1024)
        .read_to_end(&mut answer)
        .await
        .with_context(|| format!("reading the answer from {addr}"))?;
    let text = String::from_utf8_lossy(&answer);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("{addr} answered something that is not HTTP");
    };
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("?");
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase().starts_with("transfer-encoding:")
            && l.to_ascii_lowercase().contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_string()
    };
    if status != "200" {
        // Problem answers explain themselves in "detail".
        let detail = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["detail"].as_str().map(str::to_string))
            .unwrap_or_else(|| body.trim().to_string());
        bail!("{addr}{path} answered {status}: {detail}");
    }
    Ok(body)
}

/// The body of a `Transfer-Encoding: chunked` answer.
fn dechunk(mut rest: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    loop {
        let Some((size, after)) = rest.split_once("\r\n") else {
            bail!("a chunked answer ended early");
        };
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("bad chunk size {size:?}"))?;
        if size == 0 {
            return Ok(out);
        }
        let Some(chunk) = after.get(..size) else {
            bail!("a chunked answer ended inside a chunk");
        };
        out.push_str(chunk);
        rest = after.get(size..).unwrap_or("").trim_start_matches("\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::dechunk;

    #[test]
    fn chunks_are_joined() {
        assert_eq!(
            dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n").expect("chunked"),
            "hello world"
        );
        assert!(dechunk("5\r\nhel").is_err());
    }
}
