//! An issuer given at install: its files read and checked, printed as the
//! identity objects (its key then in the output, as asked).
use nodemesh_core::{
    config::parse_duration,
    identity::{MAX_CERT_LIFETIME, MIN_CERT_LIFETIME},
    pki,
};

use super::InstallArgs;

/// The PEM texts the identity objects hold.
pub(super) struct Pki {
    pub(super) trust_anchors: String,
    pub(super) issuer_cert: String,
    pub(super) issuer_key: String,
}

/// Reads the PKI files, if given, and checks the issuer against the
/// anchors; `Ok(None)`: none given (the identity service makes them).
pub(super) fn identity_pki(a: &InstallArgs, problems: &mut Vec<String>) -> Option<Option<Pki>> {
    let cert_lifetime = parse_duration(&a.identity_cert_lifetime);
    match &cert_lifetime {
        Ok(d) if (MIN_CERT_LIFETIME..=MAX_CERT_LIFETIME).contains(d) => {}
        Ok(_) => problems.push(format!(
            "--identity-cert-lifetime {:?}: must be between 10s and 7d",
            a.identity_cert_lifetime
        )),
        Err(why) => problems.push(format!(
            "--identity-cert-lifetime {:?}: {why}",
            a.identity_cert_lifetime
        )),
    }
    match parse_duration(&a.identity_issuer_lifetime) {
        Ok(d) if d >= std::time::Duration::from_secs(3600) => {}
        Ok(_) => problems.push(format!(
            "--identity-issuer-lifetime {:?}: at least 1h",
            a.identity_issuer_lifetime
        )),
        Err(why) => problems.push(format!(
            "--identity-issuer-lifetime {:?}: {why}",
            a.identity_issuer_lifetime
        )),
    }
    let (Some(anchors), Some(cert), Some(key)) = (
        &a.identity_trust_anchors_file,
        &a.identity_issuer_certificate_file,
        &a.identity_issuer_key_file,
    ) else {
        return Some(None);
    };
    let mut read = |flag: &str, path: &std::path::Path| {
        std::fs::read_to_string(path)
            .map_err(|e| problems.push(format!("--{flag} {}: {e}", path.display())))
            .ok()
    };
    let anchors = read("identity-trust-anchors-file", anchors);
    let cert = read("identity-issuer-certificate-file", cert);
    let key = read("identity-issuer-key-file", key);
    let pki = Pki {
        trust_anchors: anchors?,
        issuer_cert: cert?,
        issuer_key: key?,
    };
    if let Err(e) = pki::Signer::load(
        &pki.issuer_cert,
        &pki.issuer_key,
        &pki.trust_anchors,
        &a.trust_domain,
    ) {
        problems.push(format!("identity issuer: {e}"));
        return None;
    }
    Some(Some(pki))
}

/// The identity objects for an issuer given at install: the trust anchors
/// and the issuer's Secret (its key: in the output, as asked).
pub(super) const PKI_DOCUMENTS: &str = r#"# The trust anchors every workload certificate chains to (public).
apiVersion: v1
kind: ConfigMap
metadata:
  name: nodemesh-identity-trust-anchors
  namespace: {{namespace}}
  labels:
    app.kubernetes.io/part-of: nodemesh
data:
  ca-bundle.crt: {{trust_anchors}}
---
# The issuer, as given to `nodemesh install`: signs workload certificates.
# Only the identity service reads it (through the API; it is not mounted).
apiVersion: v1
kind: Secret
metadata:
  name: nodemesh-identity-issuer
  namespace: {{namespace}}
  labels:
    app.kubernetes.io/part-of: nodemesh
type: kubernetes.io/tls
stringData:
  tls.crt: {{issuer_cert}}
  tls.key: {{issuer_key}}
  ca.crt: {{trust_anchors}}
---
"#;

#[cfg(test)]
mod tests {
    use base64::Engine as _;

    use super::super::{InstallArgs, quoted, render, tests::object};
    use super::*;

    #[test]
    fn identity_pki_is_printed_only_when_given_and_checked() {
        let doc = |out: &str, kind: &str, name: &str| object(out, kind, Some(name));
        let out = render(&InstallArgs::default()).expect("renders");
        assert!(doc(&out, "Secret", "nodemesh-identity-issuer").is_none());
        assert!(doc(&out, "ConfigMap", "nodemesh-identity-trust-anchors").is_none());
        let anchor =
            pki::generate_trust_anchor("cluster.local", std::time::Duration::from_secs(7200))
                .unwrap();
        let issuer = pki::generate_issuer(
            &anchor,
            "cluster.local",
            std::time::Duration::from_secs(3600),
        )
        .unwrap();
        let (anchors, cert, key) = (
            anchor.cert_pem.clone(),
            issuer.cert_pem.as_str(),
            issuer.key_pem.as_str(),
        );

        // From files (asked for): the same PKI comes out, and the
        // aggregated API's caBundle; another anchor is refused.
        let dir = std::env::temp_dir().join(format!("nodemesh-install-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let mut args = InstallArgs {
            identity_trust_anchors_file: Some(write("ca.crt", &anchors)),
            ..InstallArgs::default()
        };
        args.identity_issuer_certificate_file = Some(write("issuer.crt", cert));
        args.identity_issuer_key_file = Some(write("issuer.key", key));
        let again = render(&args).expect("renders from files");
        assert!(again.contains(&quoted(cert)));
        let secret = doc(&again, "Secret", "nodemesh-identity-issuer").expect("the Secret");
        assert_eq!(
            secret["stringData"]["ca.crt"].as_str(),
            Some(anchors.as_str())
        );
        let map = doc(&again, "ConfigMap", "nodemesh-identity-trust-anchors").expect("anchors");
        assert_eq!(
            map["data"]["ca-bundle.crt"].as_str(),
            Some(anchors.as_str())
        );
        let api = doc(&again, "APIService", "v1alpha1.tap.nodemesh.io").expect("APIService");
        let bundle = base64::engine::general_purpose::STANDARD
            .decode(api["spec"]["caBundle"].as_str().expect("caBundle"))
            .expect("base64");
        assert_eq!(String::from_utf8(bundle).unwrap(), anchors);
        let other =
            pki::generate_trust_anchor("cluster.local", std::time::Duration::from_secs(600))
                .unwrap();
        args.identity_trust_anchors_file = Some(write("other.crt", &other.cert_pem));
        let err = render(&args).unwrap_err();
        assert!(
            err.to_string()
                .contains("not signed by any of the trust anchors"),
            "{err}"
        );
        args.identity_cert_lifetime = "1s".into();
        let err = render(&args).unwrap_err();
        assert!(
            err.to_string().contains("--identity-cert-lifetime"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
