//! One plain HTTP/1.1 request to a broker's HTTP port: `Connection:
//! close`, the answer read to its end. [`crate::Discovery`] asks the
//! registry with it; the `courier` CLI (`courier metrics --prometheus`,
//! `courier registry …`) and courier-bench ask the broker's other
//! endpoints. No client library: the port is the broker's own, on
//! loopback or behind the operator's TLS terminator.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Answers larger than this are refused by [`request`] and [`get`] (a
/// metrics page is far smaller).
pub const BODY_BYTES_MAX: usize = 256 * 1024 * 1024;

/// Why a request to the broker's HTTP port failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Nothing accepted the connection.
    #[error("cannot reach the broker's HTTP port at {addr}: is `courier serve` running with --http {addr}?")]
    Unreachable {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// The connection failed while the request was sent or the answer read.
    #[error("talking to the broker's HTTP port at {addr}")]
    Io {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// The answer was longer than the caller allows.
    #[error("{addr}{path} answered more than {max} bytes")]
    TooLarge {
        addr: String,
        path: String,
        max: usize,
    },
    /// What came back is not an HTTP answer.
    #[error("{addr} answered something that is not HTTP: {reason}")]
    NotHttp { addr: String, reason: String },
    /// The broker answered with another status than 200; `detail` is its
    /// explanation (a problem answer's `detail`, else the body).
    #[error("{addr}{path} answered {status}: {detail}")]
    Status {
        addr: String,
        path: String,
        status: u16,
        detail: String,
    },
}

/// A whole answer: its status and its body (de-chunked).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

/// `method path` to `addr` (`HOST:PORT`), with a bearer `token` and a JSON
/// `body` when given; the whole answer, whatever its status. Answers over
/// `max_bytes` are refused.
pub async fn exchange(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
    max_bytes: usize,
) -> Result<Answer, HttpError> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|source| HttpError::Unreachable {
            addr: addr.to_string(),
            source,
        })?;
    let io = |source| HttpError::Io {
        addr: addr.to_string(),
        source,
    };
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
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}{content}User-Agent: courier-client\r\nConnection: close\r\n\r\n{}",
        body.unwrap_or("")
    );
    stream.write_all(request.as_bytes()).await.map_err(io)?;
    let mut answer = Vec::new();
    (&mut stream)
        .take(max_bytes as u64 + 1)
        .read_to_end(&mut answer)
        .await
        .map_err(io)?;
    if answer.len() > max_bytes {
        return Err(HttpError::TooLarge {
            addr: addr.to_string(),
            path: path.to_string(),
            max: max_bytes,
        });
    }
    let (status, body) = parse_response(&answer).map_err(|reason| HttpError::NotHttp {
        addr: addr.to_string(),
        reason,
    })?;
    Ok(Answer { status, body })
}

/// `METHOD path` with an optional JSON body; the answer's body (as text)
/// when the status is 200, else [`HttpError::Status`] with the broker's
/// explanation.
pub async fn request(
    method: &str,
    addr: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Result<String, HttpError> {
    let answer = exchange(addr, method, path, token, body, BODY_BYTES_MAX).await?;
    if answer.status != 200 {
        return Err(HttpError::Status {
            addr: addr.to_string(),
            path: path.to_string(),
            status: answer.status,
            detail: problem_detail(&answer.body),
        });
    }
    Ok(String::from_utf8_lossy(&answer.body).into_owned())
}

/// `GET path` from `addr`; the body when the status is 200.
pub async fn get(addr: &str, path: &str, token: Option<&str>) -> Result<String, HttpError> {
    request("GET", addr, path, token, None).await
}

/// What an answer that is not 200 says of itself: a problem answer's
/// `detail`, else its body.
pub fn problem_detail(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["detail"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string())
}

/// Status and body of a whole HTTP/1.1 answer (read to its end).
fn parse_response(answer: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let head_end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of headers")?;
    let head = String::from_utf8_lossy(&answer[..head_end]);
    let body = &answer[head_end + 4..];
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or("no status")?;
    let chunked = head.lines().any(|line| {
        let line = line.to_ascii_lowercase();
        line.starts_with("transfer-encoding:") && line.contains("chunked")
    });
    if !chunked {
        return Ok((status, body.to_vec()));
    }
    let mut rest = body;
    let mut out = Vec::with_capacity(body.len());
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("a chunk without its size line")?;
        let size_text = String::from_utf8_lossy(&rest[..line_end]);
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("a chunk size that is not hex: {size_text:?}"))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok((status, out));
        }
        if rest.len() < size {
            return Err("the answer ends inside a chunk".to_string());
        }
        out.extend_from_slice(&rest[..size]);
        rest = rest[size..].strip_prefix(b"\r\n").unwrap_or(&rest[size..]);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails, which is its point
mod tests {
    use super::*;

    #[test]
    fn answers_plain_and_chunked_are_read_whole() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse_response(plain).unwrap(), (200, b"{}".to_vec()));
        let chunked =
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), (404, b"abcde".to_vec()));
        let extensions = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;x=1\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
        assert_eq!(
            parse_response(extensions).unwrap().1,
            b"hello world".to_vec()
        );
        assert!(parse_response(b"garbage").is_err());
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").is_err()
        );
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel")
                .is_err()
        );
    }

    #[test]
    fn a_problem_answer_explains_itself_in_its_detail() {
        assert_eq!(
            problem_detail(br#"{"title":"x","detail":"no such service"}"#),
            "no such service"
        );
        assert_eq!(problem_detail(b" plain words \n"), "plain words");
    }

    #[tokio::test]
    async fn a_port_nothing_listens_on_is_named_with_the_fix() {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .to_string();
        let err = get(&addr, "/metrics", None).await.unwrap_err();
        assert!(matches!(err, HttpError::Unreachable { .. }), "{err:?}");
        assert!(err.to_string().contains(&format!("--http {addr}")), "{err}");
    }
}
