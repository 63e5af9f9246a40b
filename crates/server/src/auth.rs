//! Who is on the other end: authentication at the handshake against the
//! manifest, and the manifest's life (load, reload, re-checking live
//! connections).

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use courier_manifest::Manifest;

pub use courier_manifest::{authenticate, ADMIN_SERVICE};

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
    use courier_manifest::Authenticated;
    use courier_proto::{Credentials, ErrorCode, Hello};

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
            "[services.web]\nsends = [\"todo.create@1\"]\ntokens = [\"{}\"]\ncertificates = [\"CN=web\"]\n\n\
             [services.todo]\ncertificates = [\"CN=todo\"]\n\n\
             [admin]\ntokens = [\"{}\"]\ncertificates = [\"CN=ops\"]\n",
            courier_manifest::hash_token("web-secret"),
            courier_manifest::hash_token("admin-secret")
        ))
        .expect("manifest")
    }

    #[test]
    fn verified_certificates_authenticate_and_must_agree_with_tokens() {
        let m = manifest();
        let auth = |service: &str, token: Option<&str>, cert: Option<&str>| {
            authenticate(Some(&m), &hello(service, token), cert)
        };
        assert_eq!(
            auth("", None, Some("CN=todo")).map(|a| a.service),
            Ok("todo".into())
        );
        assert_eq!(
            auth("todo", None, Some("CN=todo")).map(|a| a.service),
            Ok("todo".into())
        );
        assert_eq!(
            auth("", None, Some("CN=ops")),
            Ok(Authenticated {
                service: "admin".into(),
                admin: true
            })
        );
        let spoof = auth("web", None, Some("CN=todo"));
        assert!(
            matches!(spoof, Err((ErrorCode::Unauthorized, ref r)) if r.contains("client certificate belongs to service todo")),
            "{spoof:?}"
        );
        let unknown = auth("", None, Some("CN=web,O=evil"));
        assert!(
            matches!(unknown, Err((ErrorCode::Unauthorized, ref r)) if r.contains("in no service's certificates")),
            "{unknown:?}"
        );
        // Token and certificate of one service: fine; of two: refused.
        assert_eq!(
            auth("", Some("web-secret"), Some("CN=web")).map(|a| a.service),
            Ok("web".into())
        );
        let mixed = auth("", Some("web-secret"), Some("CN=todo"));
        assert!(
            matches!(mixed, Err((ErrorCode::Unauthorized, ref r)) if r.contains("service web's") && r.contains("service todo's")),
            "{mixed:?}"
        );
        assert!(auth("", Some("admin-secret"), Some("CN=web")).is_err());
        // A certificate nobody lists names nobody: the token decides.
        assert_eq!(
            auth("", Some("web-secret"), Some("CN=stranger")).map(|a| a.service),
            Ok("web".into())
        );
        // A wrong token is not rescued by a good certificate.
        assert!(auth("", Some("guess"), Some("CN=web")).is_err());
        // Without a manifest certificates add nothing.
        assert!(authenticate(None, &hello("x", None), Some("CN=web")).is_ok());
    }

    fn authenticate_plain(
        manifest: Option<&Manifest>,
        hello: &Hello,
    ) -> Result<Authenticated, (ErrorCode, String)> {
        authenticate(manifest, hello, None)
    }

    #[test]
    fn tokens_decide_the_identity() {
        let m = manifest();
        assert_eq!(
            authenticate_plain(Some(&m), &hello("web", Some("web-secret"))),
            Ok(Authenticated {
                service: "web".into(),
                admin: false
            })
        );
        assert_eq!(
            authenticate_plain(Some(&m), &hello("", Some("web-secret"))).map(|a| a.service),
            Ok("web".into())
        );
        let spoof = authenticate_plain(Some(&m), &hello("todo", Some("web-secret")));
        assert!(
            matches!(spoof, Err((ErrorCode::Unauthorized, ref r)) if r.contains("belongs to service web"))
        );
        assert!(matches!(
            authenticate_plain(Some(&m), &hello("web", None)),
            Err((ErrorCode::Unauthorized, _))
        ));
        assert!(matches!(
            authenticate_plain(Some(&m), &hello("web", Some("guess"))),
            Err((ErrorCode::Unauthorized, _))
        ));
        let admin = authenticate_plain(Some(&m), &hello("cli", Some("admin-secret")));
        assert_eq!(
            admin,
            Ok(Authenticated {
                service: "admin".into(),
                admin: true
            })
        );
        // Without a manifest: any valid name, no credentials needed.
        assert!(authenticate_plain(None, &hello("web", None)).is_ok());
        assert!(authenticate_plain(None, &hello("Not Valid", None)).is_err());
    }
}
