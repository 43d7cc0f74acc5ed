#![allow(clippy::unwrap_used, reason = "tests")]

use std::time::SystemTime;

use x509_cert::Certificate;
use x509_cert::der::{Decode, DecodePem};
use x509_cert::ext::pkix::SubjectAltName;

use super::*;

const READER: &str = "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/reader";
const ADMIN: &str = "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/admin";
const OTHER_READER: &str = "/subscriptions/00000000-0000-0000-0000-000000000002/resourceGroups/rg2/providers/Microsoft.ManagedIdentity/userAssignedIdentities/reader";

fn ids(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn selection_follows_tsh() {
    // One allowed and none asked for: that one.
    assert_eq!(select_identity(&ids(&[READER]), None).unwrap(), READER);
    // Several and none asked for: an error listing them.
    let err = select_identity(&ids(&[READER, ADMIN]), None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("multiple Azure identities") && err.contains(ADMIN),
        "{err}"
    );
    // Full ID, any case.
    assert_eq!(
        select_identity(&ids(&[READER, ADMIN]), Some(&ADMIN.to_uppercase())).unwrap(),
        ADMIN
    );
    // Bare name, any case.
    assert_eq!(
        select_identity(&ids(&[READER, ADMIN]), Some("Admin")).unwrap(),
        ADMIN
    );
    // Bare name matching two identities: ambiguous, listing both.
    let err = select_identity(&ids(&[READER, OTHER_READER, ADMIN]), Some("reader"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("ambiguous") && err.contains(OTHER_READER) && !err.contains(ADMIN),
        "{err}"
    );
    // No match: not found, listing what is allowed.
    let err = select_identity(&ids(&[READER]), Some("writer"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("failed to find") && err.contains(READER),
        "{err}"
    );
    // A name is not a substring match.
    assert!(select_identity(&ids(&[READER]), Some("ader")).is_err());
    // Nothing allowed.
    assert!(
        select_identity(&[], None)
            .unwrap_err()
            .to_string()
            .contains("no Azure identities")
    );
}

#[test]
fn roles_from_yaml_and_json_files() {
    let dir = std::env::temp_dir().join(format!("azgate-pki-roles-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let yaml = dir.join("roles.yaml");
    std::fs::write(
        &yaml,
        format!(
            "kind: role\nversion: v7\nmetadata:\n  name: azure-admin\nspec:\n  allow:\n    azure_identities:\n    - {ADMIN}\n    - {READER}\n  deny: {{}}\n---\nkind: role\nversion: v7\nmetadata:\n  name: no-admin\nspec:\n  deny:\n    azure_identities: ['{ADMIN}']\n"
        ),
    )
    .unwrap();
    // JSON is YAML: a role exported as JSON reads too.
    let json = dir.join("more.json");
    std::fs::write(
        &json,
        serde_json::json!({"kind": "role", "version": "v7", "metadata": {"name": "lockdown"},
            "spec": {"deny": {"azure_identities": ["*"]}}})
        .to_string(),
    )
    .unwrap();
    let roles = load_roles(&[yaml.clone(), json.clone()]).unwrap();
    assert_eq!(
        allowed_identities(&roles, &ids(&["azure-admin"]), &Traits::new()).unwrap(),
        [ADMIN, READER]
    );
    assert_eq!(
        allowed_identities(&roles, &ids(&["azure-admin", "no-admin"]), &Traits::new()).unwrap(),
        [READER]
    );
    assert!(
        allowed_identities(&roles, &ids(&["azure-admin", "lockdown"]), &Traits::new())
            .unwrap()
            .is_empty()
    );
    let err = allowed_identities(&roles, &ids(&["ghost"]), &Traits::new())
        .unwrap_err()
        .to_string();
    assert!(err.contains("\"ghost\" is not defined"), "{err}");
    // A bad file is named in the error, with the field.
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "kind: role\nversion: v7\nmetadata: {name: x}\nspec:\n  allow:\n    azure_identities: ['*']\n",
    )
    .unwrap();
    let err = load_roles(&[bad]).unwrap_err().to_string();
    assert!(
        err.contains("bad.yaml") && err.contains("allow.azure_identities[0]"),
        "{err}"
    );
    // The same role twice across files.
    let err = load_roles(&[yaml.clone(), yaml]).unwrap_err().to_string();
    assert!(err.contains("defined twice"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn app_certificates_carry_teleports_subject() {
    let ca = CertificateAuthority::generate("azgate dev CA", Duration::from_secs(3600)).unwrap();
    for kind in [KeyKind::P256, KeyKind::Rsa] {
        let key = AppKey::generate(kind).unwrap();
        let now = SystemTime::now();
        let pem = ca
            .issue_app(
                &AppCertificate {
                    user: Some("alice".into()),
                    roles: ids(&["azure-reader", "dev"]),
                    selected_identity: Some(READER.into()),
                    allowed_identities: ids(&[READER, ADMIN]),
                    traits: [("azure_identities".to_string(), ids(&[READER]))].into(),
                    usage: ids(&[USAGE_APPS]),
                    app_name: Some("azure-cli".into()),
                    app_cluster: Some("tele.example".into()),
                    not_before: now - BACKDATE,
                    not_after: now + Duration::from_secs(600),
                },
                key.public_key_info().unwrap(),
            )
            .unwrap();
        let identity = azgate_filter::identity::parse_app_certificate(&pem).unwrap();
        assert_eq!(identity.user, "alice");
        // One O RDN, its values in DER order as Go writes them (shorter first).
        assert_eq!(identity.roles, ["dev", "azure-reader"]);
        assert_eq!(identity.selected_identity.as_deref(), Some(READER));
        assert_eq!(identity.allowed_identities, [READER, ADMIN]);
        assert_eq!(identity.traits["azure_identities"], [READER]);
        assert_eq!(identity.usage, [USAGE_APPS]);
        assert_eq!(identity.app_name.as_deref(), Some("azure-cli"));
        assert_eq!(identity.app_cluster.as_deref(), Some("tele.example"));
        let subject = &Certificate::from_pem(pem.as_bytes())
            .unwrap()
            .tbs_certificate
            .subject;
        let sizes: Vec<usize> = subject.0.iter().map(|rdn| rdn.0.len()).collect();
        // PostalCode, O (2 values), OU, CN, 1.5, 1.10, 1.16, 1.17 x2.
        assert_eq!(sizes, [1, 2, 1, 1, 1, 1, 1, 1, 1]);
        key.check_matches(&pem).unwrap();
        assert!(
            AppKey::generate(KeyKind::P256)
                .unwrap()
                .check_matches(&pem)
                .is_err()
        );
        // The key survives a PEM round trip and signs what the filter verifies.
        let key = AppKey::from_pem(&key.to_pem().unwrap()).unwrap();
        let jwt = key
            .sign_jwt(&serde_json::json!({"resource": "https://management.azure.com/"}))
            .unwrap();
        let identity = azgate_filter::identity::parse_app_certificate(&pem).unwrap();
        let claims = azgate_filter::jwt::verify(&jwt, &identity.public_key).unwrap();
        assert_eq!(claims.resource, "https://management.azure.com/");
        assert!(!format!("{key:?}").contains("PRIVATE"));
    }
}

/// The extensions of a certificate, parsed back from its PEM.
fn extensions(pem: &str) -> Vec<x509_cert::ext::Extension> {
    Certificate::from_pem(pem.as_bytes())
        .unwrap()
        .tbs_certificate
        .extensions
        .unwrap_or_default()
}

fn decoded<T: AssociatedOid + for<'a> Decode<'a>>(
    extensions: &[x509_cert::ext::Extension],
) -> Option<(bool, T)> {
    extensions
        .iter()
        .find(|e| e.extn_id == T::OID)
        .map(|e| (e.critical, T::from_der(e.extn_value.as_bytes()).unwrap()))
}

use x509_cert::der::oid::AssociatedOid;
use x509_cert::ext::pkix::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, KeyUsages,
    SubjectKeyIdentifier,
};

#[test]
fn leaf_certificates_carry_teleports_extensions() {
    let ca = CertificateAuthority::generate("extensions", Duration::from_secs(3600)).unwrap();
    let key = AppKey::generate(KeyKind::P256).unwrap();
    let now = SystemTime::now();
    let spec = AppCertificate {
        user: Some("alice".into()),
        roles: ids(&["dev"]),
        selected_identity: None,
        allowed_identities: Vec::new(),
        traits: Traits::new(),
        usage: Vec::new(),
        app_name: None,
        app_cluster: None,
        not_before: now - BACKDATE,
        not_after: now + Duration::from_secs(600),
    };
    let app = ca.issue_app(&spec, key.public_key_info().unwrap()).unwrap();
    let server = ca
        .issue_server(
            &["gateway.test"],
            &[std::net::IpAddr::from([127, 0, 0, 1])],
            key.public_key_info().unwrap(),
            now - BACKDATE,
            now + Duration::from_secs(600),
        )
        .unwrap();
    let ca_ski = decoded::<SubjectKeyIdentifier>(&extensions(ca.cert_pem()))
        .unwrap()
        .1;
    for (pem, eku) in [
        (&app, vec![EKU_SERVER_AUTH, EKU_CLIENT_AUTH]),
        (&server, vec![EKU_SERVER_AUTH]),
    ] {
        let exts = extensions(pem);
        assert_eq!(
            decoded::<ExtendedKeyUsage>(&exts).unwrap(),
            (false, ExtendedKeyUsage(eku))
        );
        let (critical, usage) = decoded::<KeyUsage>(&exts).unwrap();
        assert!(critical);
        assert_eq!(
            usage.0,
            KeyUsages::DigitalSignature | KeyUsages::KeyEncipherment
        );
        let (critical, basic) = decoded::<BasicConstraints>(&exts).unwrap();
        assert!(critical && !basic.ca && basic.path_len_constraint.is_none());
        let (_, aki) = decoded::<AuthorityKeyIdentifier>(&exts).unwrap();
        assert_eq!(aki.key_identifier, Some(ca_ski.0.clone()));
    }
    assert!(decoded::<SubjectAltName>(&extensions(&app)).is_none());
    assert!(decoded::<SubjectAltName>(&extensions(&server)).is_some());
    // Without EKU (refusal tests only): the extension is absent, the rest unchanged.
    let bare = ca
        .issue_app_with_eku(&spec, key.public_key_info().unwrap(), None)
        .unwrap();
    assert!(decoded::<ExtendedKeyUsage>(&extensions(&bare)).is_none());
    assert!(decoded::<KeyUsage>(&extensions(&bare)).is_some());

    // What a TLS client-certificate verifier (webpki, as in `azgate serve`) makes of them:
    // the app certificate is a client certificate, the server certificate is not.
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, UnixTime};
    let der = |pem: &str| CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der(ca.cert_pem())).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        std::sync::Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap();
    let at = UnixTime::now();
    verifier.verify_client_cert(&der(&app), &[], at).unwrap();
    verifier.verify_client_cert(&der(&bare), &[], at).unwrap();
    let err = verifier
        .verify_client_cert(&der(&server), &[], at)
        .unwrap_err();
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(
                rustls::CertificateError::InvalidPurpose
                    | rustls::CertificateError::InvalidPurposeContext { .. }
            )
        ),
        "{err:?}"
    );
}

#[test]
fn ca_round_trips_through_its_directory() {
    let dir = std::env::temp_dir().join(format!("azgate-pki-dir-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ca = CertificateAuthority::generate("round trip", Duration::from_secs(3600)).unwrap();
    ca.save(&dir).unwrap();
    let loaded = CertificateAuthority::load(&dir).unwrap();
    assert_eq!(loaded.cert_pem(), ca.cert_pem());
    assert!(
        ca.save(&dir)
            .unwrap_err()
            .to_string()
            .contains("already initialised")
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.join(CA_KEY_FILE))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(!format!("{loaded:?}").contains("PRIVATE"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn durations() {
    assert_eq!(parse_duration("12h").unwrap(), Duration::from_secs(43_200));
    assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5_400));
    assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(604_800));
    for bad in ["", "12", "h", "1x", "0s", "-1h"] {
        assert!(parse_duration(bad).is_err(), "{bad}");
    }
}
