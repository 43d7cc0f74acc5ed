#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::collections::HashMap;

use super::*;

const CERTIFICATE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/client-certificate.pem"
);

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("azgate-settings-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn parse(yaml: &str) -> TokenSettings {
    serde_yaml::from_str(yaml).unwrap()
}

/// Builds with exactly these environment variables.
fn build(settings: &TokenSettings, env: &[(&str, &str)]) -> Result<BuiltTokenService, TokenError> {
    let env: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    settings.build(|name| env.get(name).cloned())
}

#[test]
fn each_source_kind_is_configured_from_yaml() {
    let dir = temp_dir("kinds");
    std::fs::write(dir.join("secret"), "s3cret\n").unwrap();
    std::fs::write(dir.join("header"), "h3ader").unwrap();

    let built = build(
        &parse("source: imds\nimds_endpoint: http://127.0.0.1:1\n"),
        &[],
    )
    .unwrap();
    assert!(matches!(built.source, Source::Imds { endpoint } if endpoint == "http://127.0.0.1:1"));

    let built = build(&parse("source: imds\n"), &[]).unwrap();
    assert!(matches!(built.source, Source::Imds { endpoint } if endpoint == IMDS_ENDPOINT));

    let yaml = format!(
        "source: app-service\nidentity_endpoint: http://127.0.0.1:2/msi/token\nidentity_header_file: {}\n",
        dir.join("header").display()
    );
    let built = build(&parse(&yaml), &[]).unwrap();
    assert!(
        matches!(&built.source, Source::AppService { endpoint, header } if endpoint == "http://127.0.0.1:2/msi/token" && header.expose() == "h3ader")
    );

    let yaml = "source: workload-identity\ntenant_id: t\nclient_id: c\nfederated_token_file: /var/run/token\nauthority_host: http://127.0.0.1:3\n";
    let built = build(&parse(yaml), &[]).unwrap();
    assert!(matches!(
        &built.source,
        Source::WorkloadIdentity { authority_host, tenant_id, client_id, token_file }
            if authority_host == "http://127.0.0.1:3" && tenant_id == "t" && client_id == "c"
                && token_file == Path::new("/var/run/token")
    ));

    let yaml = format!(
        "source: client-secret\ntenant_id: t\nclient_id: c\nclient_secret_file: {}\n",
        dir.join("secret").display()
    );
    let built = build(&parse(&yaml), &[]).unwrap();
    assert!(matches!(
        &built.source,
        Source::ClientSecret { authority_host, secret, .. }
            if authority_host == DEFAULT_AUTHORITY_HOST && secret.expose() == "s3cret"
    ));
    assert!(!format!("{built:?}").contains("s3cret"), "{built:?}");

    let yaml = format!(
        "source: client-certificate\ntenant_id: t\nclient_id: c\nclient_certificate_path: {CERTIFICATE}\n"
    );
    let built = build(&parse(&yaml), &[]).unwrap();
    assert_eq!(built.source.kind(), "client_certificate");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn left_out_settings_fall_back_to_the_standard_variables() {
    // The AKS workload-identity webhook's variables, nothing in the file but the kind.
    let env = [
        ("AZURE_CLIENT_ID", "c"),
        ("AZURE_TENANT_ID", "t"),
        (
            "AZURE_FEDERATED_TOKEN_FILE",
            "/var/run/secrets/azure/tokens/azure-identity-token",
        ),
        ("AZURE_AUTHORITY_HOST", "https://login.microsoftonline.com/"),
    ];
    let built = build(&parse("source: workload-identity\n"), &env).unwrap();
    assert_eq!(built.source.kind(), "workload_identity");
    // auto detects the same.
    let built = build(&TokenSettings::default(), &env).unwrap();
    assert_eq!(built.source.kind(), "workload_identity");
    // The file wins over the environment.
    let built = build(&parse("client_id: from-file\n"), &env).unwrap();
    assert!(
        matches!(built.source, Source::WorkloadIdentity { client_id, .. } if client_id == "from-file")
    );
    // Auto with nothing is IMDS; with imds_endpoint, that IMDS.
    let built = build(&parse("imds_endpoint: http://127.0.0.1:9\n"), &[]).unwrap();
    assert!(matches!(built.source, Source::Imds { endpoint } if endpoint == "http://127.0.0.1:9"));
}

#[test]
fn limits_allow_list_and_the_app_service_secret() {
    let dir = temp_dir("limits");
    std::fs::write(dir.join("msi-header"), "  the-header \n").unwrap();
    let yaml = format!(
        "source: imds\nallow_identities: [system, client_id=c1, 'msi_res_id=/subscriptions/s/x']\n\
         deadline_ms: 1500\nmax_concurrent_requests: 2\nmax_requests_per_second: 7\nmax_entries: 9\n\
         app_service_header_file: {}\n",
        dir.join("msi-header").display()
    );
    let built = build(&parse(&yaml), &[]).unwrap();
    assert_eq!(
        built.allowed.unwrap(),
        [
            ManagedIdentity::SystemAssigned,
            ManagedIdentity::ClientId("c1".into()),
            ManagedIdentity::ResourceId("/subscriptions/s/x".into()),
        ]
    );
    assert_eq!(built.config.deadline, Duration::from_millis(1500));
    assert_eq!(built.config.max_concurrent_requests, 2);
    assert_eq!(built.config.max_requests_per_second, 7);
    assert_eq!(built.config.max_entries, 9);
    assert_eq!(built.app_service_header.unwrap().expose(), "the-header");

    // Defaults: everything allowed, App Service off, Azure's limits.
    let built = build(&parse("source: imds\n"), &[]).unwrap();
    assert!(built.allowed.is_none() && built.app_service_header.is_none());
    assert_eq!(built.config, ProviderConfig::default());
    // The App Service secret also comes from AZGATE_IDENTITY_HEADER.
    let built = build(&parse("source: imds\n"), &[(APP_SERVICE_HEADER_ENV, "h")]).unwrap();
    assert_eq!(built.app_service_header.unwrap().expose(), "h");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn unusable_settings_are_refused_with_the_setting_named() {
    let dir = temp_dir("refused");
    std::fs::write(dir.join("empty"), "\n").unwrap();
    let cases = [
        (
            "source: workload-identity\ntenant_id: t\n".to_owned(),
            "client_id",
        ),
        (
            "source: client-secret\ntenant_id: t\nclient_id: c\n".to_owned(),
            "client_secret_file",
        ),
        ("source: app-service\n".to_owned(), "identity_endpoint"),
        (
            "source: client-certificate\ntenant_id: t\nclient_id: c\n".to_owned(),
            "client_certificate_path",
        ),
        (
            format!(
                "source: imds\napp_service_header_file: {}\n",
                dir.join("empty").display()
            ),
            "app_service_header: is empty",
        ),
        (
            "source: imds\napp_service_header_file: /nonexistent/x\n".to_owned(),
            "/nonexistent/x",
        ),
        (
            "source: imds\napp_service_header_env: AZGATE_TEST_SURELY_UNSET_VARIABLE\n".to_owned(),
            "AZGATE_TEST_SURELY_UNSET_VARIABLE is not set",
        ),
        (
            "source: imds\nclient_secret_file: /a\nclient_secret_env: B\n".to_owned(),
            "give one of",
        ),
        (
            "source: imds\nmax_entries: 0\n".to_owned(),
            "max_entries must be positive",
        ),
    ];
    for (yaml, expected) in cases {
        match build(&parse(&yaml), &[]) {
            Err(TokenError::Configuration(message)) => {
                assert!(message.contains(expected), "{yaml}: {message}");
            }
            other => panic!("{yaml}: {other:?}"),
        }
    }
    // YAML cannot carry a secret inline, and unknown keys or identities are errors.
    for yaml in [
        "client_secret: s\n",
        "identity_header: h\n",
        "app_service_header: h\n",
        "source: magic\n",
        "allow_identities: [bogus]\n",
    ] {
        assert!(
            serde_yaml::from_str::<TokenSettings>(yaml).is_err(),
            "{yaml}"
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn the_command_line_carries_the_settings_but_no_secret() {
    let yaml = "source: client-secret\ntenant_id: t\nclient_id: c\nclient_secret_env: SP_SECRET\n\
                allow_identities: [system, 'msi_res_id=/subscriptions/s/a b']\nmax_entries: 10\n\
                app_service_header_file: /etc/azgate/msi header\n";
    let line = parse(yaml).command_line("127.0.0.1:50342");
    assert_eq!(
        line,
        "AZURE_CLIENT_SECRET=\"$SP_SECRET\" azgate token-service --listen 127.0.0.1:50342 \
         --source client-secret --tenant-id t --client-id c --allow-identity system \
         --allow-identity 'msi_res_id=/subscriptions/s/a b' --max-entries 10 \
         --app-service-header-file '/etc/azgate/msi header'"
    );
    assert_eq!(
        TokenSettings::default().command_line("unix:/run/azgate/token.sock"),
        "azgate token-service --listen unix:/run/azgate/token.sock"
    );
    assert_eq!(shell_quote("it's"), r"'it'\''s'");
}
