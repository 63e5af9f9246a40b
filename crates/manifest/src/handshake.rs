//! The handshake's authentication decision, pure: a HELLO (and the subject
//! of a verified client certificate) against the manifest in force. The
//! broker's network edge calls it for every connection; the
//! `handshake` fuzz target feeds it arbitrary frames.

use courier_proto::{validate_name, Credentials, ErrorCode, Hello};

use crate::{Identity, Manifest};

/// The authenticated identity of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    pub service: String,
    pub admin: bool,
}

/// The service name the manifest reserves for the admin role.
pub const ADMIN_SERVICE: &str = "admin";

/// Checks a HELLO against the manifest in force. Without a manifest,
/// anyone may connect as any service (development on loopback).
///
/// `certificate` is the RFC 4514 subject of the client certificate that
/// rustls verified against `--tls-client-ca` (never from the frame). With a
/// manifest, a HELLO without a token is authenticated by that subject
/// (`certificates = ["CN=web"]`). A token and a certificate that the
/// manifest gives to different identities are refused; a certificate whose
/// subject no service lists names nobody, and the token decides alone.
pub fn authenticate(
    manifest: Option<&Manifest>,
    hello: &Hello,
    certificate: Option<&str>,
) -> Result<Authenticated, (ErrorCode, String)> {
    let Some(manifest) = manifest else {
        if hello.service.is_empty() {
            return Err((
                ErrorCode::InvalidName,
                "no service name given: pass --service NAME (this broker has no manifest to look a token up in)"
                    .to_string(),
            ));
        }
        validate_name(&hello.service)
            .map_err(|e| (ErrorCode::InvalidName, format!("service name: {e}")))?;
        return Ok(Authenticated {
            service: hello.service.clone(),
            admin: false,
        });
    };
    let by_certificate = certificate.and_then(|s| manifest.authenticate_certificate(s));
    let identity = match (&hello.credentials, certificate) {
        (Credentials::Token(token), _) => {
            let by_token = manifest.authenticate_token(token);
            if let (Some(t), Some(c), Some(subject)) = (&by_token, &by_certificate, certificate) {
                if t != c {
                    return Err((
                        ErrorCode::Unauthorized,
                        format!(
                            "the token is {} but the client certificate {subject:?} is {}; present the credentials of one service",
                            describe(t),
                            describe(c)
                        ),
                    ));
                }
            }
            by_token.ok_or_else(|| {
                (
                    ErrorCode::Unauthorized,
                    "the token is not in the manifest (unknown, revoked, or mistyped)".to_string(),
                )
            })?
        }
        (_, Some(subject)) => by_certificate.ok_or_else(|| {
            (
                ErrorCode::Unauthorized,
                format!(
                    "the client certificate {subject:?} is in no service's certificates in the manifest"
                ),
            )
        })?,
        (_, None) => {
            return Err((
                ErrorCode::Unauthorized,
                "this broker requires credentials: pass --token or set COURIER_TOKEN (see 'courier token new'), or a client certificate (--tls-cert, --tls-key)".to_string(),
            ))
        }
    };
    match identity {
        Identity::Admin => Ok(Authenticated {
            service: ADMIN_SERVICE.to_string(),
            admin: true,
        }),
        Identity::Service(name) => {
            // The sender of every message is this name, whatever the
            // client claims; a mismatching claim is refused, not corrected,
            // so misconfigured services fail loudly.
            if !hello.service.is_empty() && hello.service != name {
                return Err((
                    ErrorCode::Unauthorized,
                    format!(
                        "{} belongs to service {name}, not {:?}",
                        if matches!(hello.credentials, Credentials::Token(_)) {
                            "this token"
                        } else {
                            "this client certificate"
                        },
                        hello.service
                    ),
                ));
            }
            Ok(Authenticated {
                service: name,
                admin: false,
            })
        }
    }
}

fn describe(identity: &Identity) -> String {
    match identity {
        Identity::Admin => "the admin's".to_string(),
        Identity::Service(name) => format!("service {name}'s"),
    }
}
