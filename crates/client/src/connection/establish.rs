//! Establishing a connection: TCP or TLS (or a `Connector`), then the
//! handshake (HELLO → WELCOME) within its timeout.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::BytesMut;
use courier_proto::{
    decode_frame, Credentials, Frame, Hello, FRAME_BYTES_MAX_DEFAULT, PROTOCOL_VERSION,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::options::rotation;
use crate::{BoxRead, BoxWrite, ClientOptions, ClientTls, Connector, Error, Result};

use super::*;

/// The read half of a connection. Plain TCP keeps `TcpStream`'s owned
/// halves (no lock between reader and writer); a TLS session is one state
/// machine for both directions, so its halves share `tokio::io::split`'s
/// lock. An enum rather than a `Box<dyn …>`: no allocation or virtual call
/// on the plain path.
pub(crate) enum Reader {
    Plain(OwnedReadHalf),
    Tls(tokio::io::ReadHalf<TlsStream<TcpStream>>),
    Other(BoxRead),
}

pub(crate) enum Writer {
    Plain(OwnedWriteHalf),
    Tls(tokio::io::WriteHalf<TlsStream<TcpStream>>),
    Other(BoxWrite),
}

impl AsyncRead for Reader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Reader::Plain(r) => Pin::new(r).poll_read(cx, buf),
            Reader::Tls(r) => Pin::new(r).poll_read(cx, buf),
            Reader::Other(r) => r.as_mut().poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Writer {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Writer::Plain(w) => Pin::new(w).poll_write(cx, buf),
            Writer::Tls(w) => Pin::new(w).poll_write(cx, buf),
            Writer::Other(w) => w.as_mut().poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Writer::Plain(w) => Pin::new(w).poll_flush(cx),
            Writer::Tls(w) => Pin::new(w).poll_flush(cx),
            Writer::Other(w) => w.as_mut().poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Writer::Plain(w) => Pin::new(w).poll_shutdown(cx),
            Writer::Tls(w) => Pin::new(w).poll_shutdown(cx),
            Writer::Other(w) => w.as_mut().poll_shutdown(cx),
        }
    }
}

/// A rustls client set-up from the PEM files of `tls` (read now, so
/// renewed files count at the next reconnect).
pub(crate) fn tls_connector(
    tls: &ClientTls,
) -> std::result::Result<tokio_rustls::TlsConnector, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certificates = |path: &std::path::Path, what: &str| {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect::<std::result::Result<Vec<_>, _>>())
            .map_err(|e| format!("cannot read {what} {}: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "{what} {} holds no PEM CERTIFICATE block",
                path.display()
            ));
        }
        Ok(certs)
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(&tls.ca, "the TLS CA file")? {
        roots.add(cert).map_err(|e| {
            format!(
                "the TLS CA file {} holds an unusable certificate: {e}",
                tls.ca.display()
            )
        })?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up: {e}"))?
        .with_root_certificates(roots);
    let mut config = match &tls.client_cert {
        Some((cert, key)) => {
            let chain = certificates(cert, "the client certificate file")?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("cannot read a private key from {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("the client certificate and key do not match: {e}"))?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// The name the broker's certificate must carry: the override, else the
/// host part of `address` (`host:port`, an IP address or a DNS name).
pub(crate) fn server_name(
    address: &str,
    tls: &ClientTls,
) -> std::result::Result<ServerName<'static>, String> {
    let host = match &tls.server_name {
        Some(name) => name.as_str(),
        None => address
            .rsplit_once(':')
            .map_or(address, |(host, _)| host)
            .trim_start_matches('[')
            .trim_end_matches(']'),
    };
    ServerName::try_from(host.to_string())
        .map_err(|e| format!("{host:?} is not a name a TLS certificate can carry: {e}"))
}

/// Why a TLS session failed, in words that point at the fix.
pub(crate) fn tls_failure(addr: &str, e: &std::io::Error) -> String {
    let hint = match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(_)) => {
            "; the broker's certificate is not signed by the trusted CA (--tls-ca / COURIER_TLS_CA) or does not name this host".to_string()
        }
        Some(rustls::Error::InvalidMessage(_)) => {
            "; is the broker listening with TLS (courier serve --tls-cert --tls-key)?".to_string()
        }
        Some(rustls::Error::AlertReceived(alert)) => format!(
            "; the broker refused the TLS session ({alert:?}): is this client certificate (--tls-cert) signed by the broker's --tls-client-ca?"
        ),
        _ => String::new(),
    };
    format!("TLS session with {addr} failed: {e}{hint}")
}

/// Connects and completes HELLO/WELCOME: through `connector` when there
/// is one, else over TCP (and TLS) to each of `addresses` in turn, from
/// the one after `last` (the index of the address connected to last),
/// until one answers. With several addresses, all failing fails with
/// [`Error::Unreachable`], naming each; with one, with its own error.
pub(crate) async fn establish(
    opts: &ClientOptions,
    addresses: &[String],
    last: Option<usize>,
    connector: Option<&Connector>,
) -> Result<Established> {
    if let Some(connector) = connector {
        return establish_via(opts, connector).await;
    }
    let mut failures = Vec::new();
    for index in rotation(addresses.len(), last) {
        let Some(address) = addresses.get(index) else {
            continue;
        };
        match establish_at(opts, address).await {
            Ok(mut established) => {
                established.address = index;
                return Ok(established);
            }
            Err(error) => {
                if addresses.len() > 1 {
                    debug!(%address, %error, "no broker there; trying the next address");
                }
                failures.push((address.clone(), error));
            }
        }
    }
    if failures.len() <= 1 {
        return Err(failures.pop().map_or_else(
            || Error::Options("no broker address given".into()),
            |(_, error)| error,
        ));
    }
    Err(Error::Unreachable { failures })
}

/// Over the byte stream `connector` opens; [`ClientOptions::url`] only
/// names the broker in errors.
async fn establish_via(opts: &ClientOptions, connector: &Connector) -> Result<Established> {
    let connect_error = |source| Error::Connect {
        addr: opts.url.clone(),
        source,
    };
    let (reader, writer) = tokio::time::timeout(HANDSHAKE_TIMEOUT, (connector.0)())
        .await
        .map_err(|_| {
            connect_error(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connect timed out",
            ))
        })?
        .map_err(connect_error)?;
    handshake(
        opts,
        &opts.url,
        Reader::Other(reader),
        Writer::Other(writer),
        None,
    )
    .await
}

/// Over TCP (and TLS) to `address`, each step within its timeout.
async fn establish_at(opts: &ClientOptions, address: &str) -> Result<Established> {
    let connect_error = |source| Error::Connect {
        addr: address.to_string(),
        source,
    };
    let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(address))
        .await
        .map_err(|_| {
            connect_error(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connect timed out",
            ))
        })?
        .map_err(connect_error)?;
    let _ = stream.set_nodelay(true);
    let mut direct = None;
    let (reader, writer) = match &opts.tls {
        None => {
            // A second descriptor of the same socket, non-blocking like the
            // first: tokio keeps the first registered, the client writes a
            // lone request through the second without waking a worker.
            let socket = stream.into_std().map_err(connect_error)?;
            direct = socket.try_clone().ok();
            let stream = TcpStream::from_std(socket).map_err(connect_error)?;
            let (reader, writer) = stream.into_split();
            (Reader::Plain(reader), Writer::Plain(writer))
        }
        Some(tls) => {
            let setup_error = |message: String| {
                connect_error(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    message,
                ))
            };
            let connector = tls_connector(tls).map_err(setup_error)?;
            let name = server_name(address, tls).map_err(setup_error)?;
            let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, stream))
                .await
                .map_err(|_| Error::Closed("no TLS handshake with the broker within 10 s".into()))?
                .map_err(|e| Error::Closed(tls_failure(address, &e)))?;
            let (reader, writer) = tokio::io::split(stream);
            (Reader::Tls(reader), Writer::Tls(writer))
        }
    };
    handshake(opts, address, reader, writer, direct).await
}

/// HELLO, then the broker's WELCOME (or its refusal).
pub(crate) async fn handshake(
    opts: &ClientOptions,
    address: &str,
    mut reader: Reader,
    mut writer: Writer,
    direct: Option<std::net::TcpStream>,
) -> Result<Established> {
    let is_tls = matches!(reader, Reader::Tls(_));
    let connect_error = |source| Error::Connect {
        addr: address.to_string(),
        source,
    };
    // Errors on an established TLS session (a refused client certificate
    // arrives as an alert after the client's side of the handshake).
    let session_error = |e: std::io::Error| {
        if is_tls {
            Error::Closed(tls_failure(address, &e))
        } else {
            connect_error(e)
        }
    };
    let mut out = courier_proto::FrameWriter::new();
    out.push(&Frame::Hello(Hello {
        version: PROTOCOL_VERSION,
        service: opts.service.clone(),
        instance: opts.instance.clone(),
        max_in_flight: opts.max_in_flight,
        credentials: opts
            .token
            .clone()
            .map(Credentials::Token)
            .unwrap_or_default(),
    }))?;
    writer.write_all(&out.take()).await.map_err(session_error)?;
    writer.flush().await.map_err(session_error)?;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let welcome = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        loop {
            match decode_frame(&mut buf, INBOUND_FRAME_BYTES_MAX) {
                Ok(Some(frame)) => return Ok(frame),
                Ok(None) => {}
                Err(e) => {
                    // A TLS record (alert 0x15 or handshake 0x16, version 3.x).
                    let hint = if !is_tls && matches!(buf.get(..2), Some([0x15 | 0x16, 0x03])) {
                        "; it looks like TLS: pass --tls-ca (COURIER_TLS_CA)"
                    } else {
                        ""
                    };
                    return Err(Error::Closed(format!("broker sent a bad frame: {e}{hint}")));
                }
            }
            match reader.read_buf(&mut buf).await {
                Ok(0) => {
                    return Err(Error::Closed(if is_tls {
                        "broker closed the connection during the handshake (did it refuse this client certificate?)".into()
                    } else {
                        "broker closed the connection during the handshake".into()
                    }))
                }
                Ok(_) => {}
                Err(e) => return Err(session_error(e)),
            }
        }
    })
    .await
    .map_err(|_| Error::Closed("no WELCOME from the broker within 10 s".into()))??;
    match welcome {
        Frame::Welcome(w) => Ok(Established {
            reader,
            writer,
            direct,
            buf,
            frame_bytes_max: if w.frame_bytes_max == 0 {
                FRAME_BYTES_MAX_DEFAULT
            } else {
                w.frame_bytes_max
            },
            // A broker of version 1 gets messages without parent_id.
            version: w.version.min(PROTOCOL_VERSION),
            service: w.service.unwrap_or_else(|| opts.service.clone()),
            address: 0,
        }),
        Frame::Error(e) => Err(Error::Refused {
            code: e.code,
            reason: e.message,
        }),
        other => Err(Error::Closed(format!("expected WELCOME, got {other:?}"))),
    }
}
