//! Who is on the other end: authentication at the handshake against the
//! manifest, and the manifest's life (load, reload, re-checking live
//! connections).

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use courier_manifest::{Identity, Manifest};
use courier_proto::{validate_name, Credentials, ErrorCode, Hello};

/// The authenticated identity of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Authenticated {
    pub service: String,
    pub admin: bool,
}

/// The service name the manifest reserves for the admin role.
pub const ADMIN_SERVICE: &str = "admin";

/// Checks a HELLO against the manifest in force. Without a manifest,
/// anyone may connect as any service (development on loopback).
pub(crate) fn authenticate(
    manifest: Option<&Manifest>,
    hello: &Hello,
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
    let Credentials::Token(token) = &hello.credentials else {
        return Err((
            ErrorCode::Unauthorized,
            "this broker requires credentials: pass --token or set COURIER_TOKEN (see 'courier token new')".to_string(),
        ));
    };
    match manifest.authenticate_token(token) {
        Some(Identity::Admin) => Ok(Authenticated {
            service: ADMIN_SERVICE.to_string(),
            admin: true,
        }),
        Some(Identity::Service(name)) => {
            // The sender of every message is this name, whatever the
            // client claims; a mismatching claim is refused, not corrected,
            // so misconfigured services fail loudly.
            if !hello.service.is_empty() && hello.service != name {
                return Err((
                    ErrorCode::Unauthorized,
                    format!(
                        "this token belongs to service {name}, not {:?}",
                        hello.service
                    ),
                ));
            }
            Ok(Authenticated {
                service: name,
                admin: false,
            })
        }
        None => Err((
            ErrorCode::Unauthorized,
            "the token is not in the manifest (unknown, revoked, or mistyped)".to_string(),
        )),
    }
}

/// Reads and parses a manifest file; errors name file, line and column.
pub fn load_manifest(path: &Path) -> Result<(Arc<Manifest>, Option<SystemTime>), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let manifest = Manifest::parse_bytes(&bytes)
        .map_err(|e| e.with_origin(path.display().to_string()).to_string())?;
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    Ok((Arc::new(manifest), modified))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(service: &str, token: Option<&str>) -> Hello {
        Hello {
            version: 1,
            service: service.into(),
            instance: String::new(),
            max_in_flight: 0,
            credentials: token
                .map(|t| Credentials::Token(t.into()))
                .unwrap_or_default(),
        }
    }

    fn manifest() -> Manifest {
        Manifest::parse(&format!(
            "[services.web]\nsends = [\"todo.create@1\"]\ntokens = [\"{}\"]\n\n[admin]\ntokens = [\"{}\"]\n",
            courier_manifest::hash_token("web-secret"),
            courier_manifest::hash_token("admin-secret")
        ))
        .expect("manifest")
    }

    #[test]
    fn tokens_decide_the_identity() {
        let m = manifest();
        assert_eq!(
            authenticate(Some(&m), &hello("web", Some("web-secret"))),
            Ok(Authenticated {
                service: "web".into(),
                admin: false
            })
        );
        assert_eq!(
            authenticate(Some(&m), &hello("", Some("web-secret"))).map(|a| a.service),
            Ok("web".into())
        );
        let spoof = authenticate(Some(&m), &hello("todo", Some("web-secret")));
        assert!(
            matches!(spoof, Err((ErrorCode::Unauthorized, ref r)) if r.contains("belongs to service web"))
        );
        assert!(matches!(
            authenticate(Some(&m), &hello("web", None)),
            Err((ErrorCode::Unauthorized, _))
        ));
        assert!(matches!(
            authenticate(Some(&m), &hello("web", Some("guess"))),
            Err((ErrorCode::Unauthorized, _))
        ));
        let admin = authenticate(Some(&m), &hello("cli", Some("admin-secret")));
        assert_eq!(
            admin,
            Ok(Authenticated {
                service: "admin".into(),
                admin: true
            })
        );
        // Without a manifest: any valid name, no credentials needed.
        assert!(authenticate(None, &hello("web", None)).is_ok());
        assert!(authenticate(None, &hello("Not Valid", None)).is_err());
    }
}
