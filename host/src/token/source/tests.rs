#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::collections::HashMap;

use serde_json::json;

use super::*;
use azgate_emulator::{self as emulator, Emulator};

/// A PEM bundle with a throwaway RSA key and its self-signed certificate (test-only; SHA-1
/// fingerprint 1B:24:52:91:8C:46:69:96:1A:25:0D:E0:FE:CE:F9:C8:95:80:17:72).
const TEST_CERTIFICATE: &[u8] = include_bytes!("../../../tests/fixtures/client-certificate.pem");

fn ok(body: serde_json::Value) -> Response<Bytes> {
    Response::new(Bytes::from(body.to_string()))
}

fn status(code: u16, body: &str) -> Response<Bytes> {
    let mut response = Response::new(Bytes::from(body.to_owned()));
    *response.status_mut() = http::StatusCode::from_u16(code).unwrap();
    response
}

/// The form fields of a POST the emulator recorded.
fn form_fields(request: &emulator::RecordedRequest) -> HashMap<String, String> {
    form_urlencoded::parse(request.body.as_bytes())
        .into_owned()
        .collect()
}

fn claims(token: &str) -> Value {
    serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(token.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap()
}

#[test]
fn expiry_is_read_from_numbers_numeric_strings_and_date_strings() {
    let now = unix_now();
    let cases = [
        (
            json!({"access_token": "t", "expires_on": 1_900_000_000}),
            1_900_000_000,
        ),
        (
            json!({"access_token": "t", "expires_on": "1900000000"}),
            1_900_000_000,
        ),
        (
            json!({"access_token": "t", "expires_on": 1_900_000_000.5}),
            1_900_000_000,
        ),
        (
            json!({"access_token": "t", "expires_on": "1/16/2030 5:24:12 AM +00:00"}),
            1_894_771_452,
        ),
        (
            json!({"access_token": "t", "expires_on": "01/16/2030 05:24:12 +00:00"}),
            1_894_771_452,
        ),
        // expires_on wins over expires_in, which IMDS's own cache makes ambiguous.
        (
            json!({"access_token": "t", "expires_on": "1900000000", "expires_in": "5"}),
            1_900_000_000,
        ),
    ];
    for (body, expected) in cases {
        assert_eq!(
            parse_response(&ok(body.clone())).unwrap().expires_on,
            expected,
            "{body}"
        );
    }
    for body in [
        json!({"access_token": "t", "expires_in": 3599}),
        json!({"access_token": "t", "expires_in": "3599"}),
        json!({"access_token": "t", "expires_on": "", "expires_in": "3599"}),
    ] {
        let expires_on = parse_response(&ok(body.clone())).unwrap().expires_on;
        assert!(expires_on.abs_diff(now + 3599) <= 1, "{body}");
    }
}

#[test]
fn unusable_success_bodies_are_malformed_responses() {
    for body in [
        json!({"expires_in": "3599"}),
        json!({"access_token": "", "expires_in": "3599"}),
        json!({"access_token": "t"}),
        json!({"access_token": "t", "expires_on": "tomorrow"}),
        json!({"access_token": "t", "expires_in": "-5"}),
    ] {
        let error = parse_response(&ok(body.clone())).unwrap_err();
        assert!(
            matches!(error, TokenError::MalformedResponse(_)),
            "{body}: {error:?}"
        );
    }
    let error = parse_response(&Response::new(Bytes::from_static(
        b"{\"access_token\": \"ey",
    )))
    .unwrap_err();
    assert!(matches!(error, TokenError::MalformedResponse(_)));
}

#[test]
fn each_sources_error_body_is_understood() {
    let imds = parse_response(&status(
        400,
        r#"{"error":"invalid_request","error_description":"Identity not found"}"#,
    ));
    assert_eq!(
        imds.unwrap_err(),
        TokenError::UpstreamRejected {
            status: 400,
            code: "invalid_request".into(),
            description: "Identity not found".into()
        }
    );
    let service_fabric = parse_response(&status(
        404,
        r#"{"error":{"correlationId":"c","code":"ManagedIdentityNotFound","message":"no identity"}}"#,
    ))
    .unwrap_err();
    assert_eq!(service_fabric.error_code(), "ManagedIdentityNotFound");
    assert!(service_fabric.to_string().contains("no identity"));
    let app_service =
        parse_response(&status(500, r#"{"statusCode":500,"message":"boom"}"#)).unwrap_err();
    assert!(app_service.is_transient());
    assert!(app_service.to_string().contains("boom"));
    let plain = parse_response(&status(502, "<html>bad gateway</html>")).unwrap_err();
    assert!(plain.to_string().contains("bad gateway"));

    let mut throttled = status(
        429,
        r#"{"error":"invalid_request","error_description":"Temporarily throttled"}"#,
    );
    throttled
        .headers_mut()
        .insert("retry-after", "17".parse().unwrap());
    let throttled = parse_response(&throttled).unwrap_err();
    assert_eq!(throttled.retry_after(), Some(Duration::from_secs(17)));
    assert_eq!(throttled.http_status(), 429);
}

#[test]
fn detection_follows_the_azure_sdks_order() {
    let detect = |pairs: &[(&str, &str)]| {
        let env: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Source::detect(|name| env.get(name).cloned())
    };
    let everything = [
        ("AZURE_TENANT_ID", "tenant"),
        ("AZURE_CLIENT_ID", "client"),
        ("AZURE_CLIENT_SECRET", "secret"),
        ("AZURE_FEDERATED_TOKEN_FILE", "/var/run/secrets/token"),
        ("IDENTITY_ENDPOINT", "http://localhost:4141/msi/token"),
        ("IDENTITY_HEADER", "header"),
    ];
    assert_eq!(detect(&everything).unwrap().kind(), "client_secret");
    assert_eq!(
        detect(&everything[..1]).unwrap().kind(),
        "imds",
        "a tenant alone is not a credential"
    );
    let without_secret: Vec<_> = everything
        .iter()
        .copied()
        .filter(|(k, _)| *k != "AZURE_CLIENT_SECRET")
        .collect();
    assert_eq!(detect(&without_secret).unwrap().kind(), "workload_identity");
    assert_eq!(detect(&everything[4..]).unwrap().kind(), "app_service");
    match detect(&[("AZURE_POD_IDENTITY_AUTHORITY_HOST", "http://127.0.0.1:2579")]).unwrap() {
        Source::Imds { endpoint } => assert_eq!(endpoint, "http://127.0.0.1:2579"),
        other => panic!("{other:?}"),
    }
    match detect(&[]).unwrap() {
        Source::Imds { endpoint } => assert_eq!(endpoint, IMDS_ENDPOINT),
        other => panic!("{other:?}"),
    }
    let service_fabric = [("IDENTITY_SERVER_THUMBPRINT", "ab")];
    assert!(matches!(
        detect(&[everything[4], everything[5], service_fabric[0]]),
        Err(TokenError::Configuration(_))
    ));
}

#[test]
fn secrets_never_show_in_debug_output() {
    let source = Source::ClientSecret {
        authority_host: DEFAULT_AUTHORITY_HOST.into(),
        tenant_id: "t".into(),
        client_id: "c".into(),
        secret: Secret::new("hunter2"),
    };
    let debug = format!("{source:?}");
    assert!(!debug.contains("hunter2"), "{debug}");
    assert!(debug.contains("..."));
    let certificate = ClientCertificate::from_pem(TEST_CERTIFICATE).unwrap();
    assert_eq!(
        format!("{certificate:?}"),
        "ClientCertificate { key: \"...\" }"
    );
}

#[tokio::test]
async fn app_service_requests_carry_the_identity_header_and_its_selectors() {
    let emulator = Emulator::in_memory();
    let source = Source::AppService {
        endpoint: emulator.identity_endpoint(),
        header: Secret::new(emulator::DEFAULT_IDENTITY_HEADER),
    };
    let resource_id = "/subscriptions/s/resourcegroups/r/providers/Microsoft.ManagedIdentity/userAssignedIdentities/u";
    let token = source
        .fetch_once(
            &emulator,
            &ManagedIdentity::ResourceId(resource_id.into()),
            "https://vault.azure.net",
        )
        .await
        .unwrap();
    assert_eq!(claims(token.secret.expose())["xms_mirid"], resource_id);
    let request = &emulator.requests()[0];
    assert_eq!(
        request.query_param("api-version").as_deref(),
        Some("2019-08-01")
    );
    assert_eq!(
        request.query_param("mi_res_id").as_deref(),
        Some(resource_id)
    );
    assert_eq!(
        request.header("x-identity-header"),
        Some(emulator::DEFAULT_IDENTITY_HEADER)
    );

    // A rotated header that azgate does not know yet is a 401, not retried.
    emulator.set_identity_header("rotated");
    let error = source
        .fetch_once(
            &emulator,
            &ManagedIdentity::SystemAssigned,
            "https://vault.azure.net",
        )
        .await;
    assert!(
        matches!(error, Err(TokenError::UpstreamRejected { status: 401, .. })),
        "{error:?}"
    );
}

#[tokio::test]
async fn workload_identity_exchanges_the_current_federated_token_per_client_id() {
    let emulator = Emulator::in_memory();
    let directory = std::env::temp_dir().join(format!("azgate-wi-{}", std::process::id()));
    std::fs::create_dir_all(&directory).unwrap();
    let token_file = directory.join("token");
    std::fs::write(
        &token_file,
        "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2EifQ.c2ln\n",
    )
    .unwrap();
    let source = Source::WorkloadIdentity {
        authority_host: emulator.base_url(),
        tenant_id: emulator::TENANT_ID.into(),
        client_id: "default-client".into(),
        token_file: token_file.clone(),
    };

    let token = source
        .fetch_once(
            &emulator,
            &ManagedIdentity::ClientId("other-client".into()),
            "https://management.azure.com/",
        )
        .await
        .unwrap();
    assert_eq!(
        claims(token.secret.expose())["aud"],
        "https://management.azure.com/"
    );
    let request = &emulator.requests()[0];
    assert_eq!(request.method, "POST");
    assert_eq!(
        request.path(),
        format!("/{}/oauth2/v2.0/token", emulator::TENANT_ID)
    );
    let form = form_fields(request);
    assert_eq!(form["client_id"], "other-client");
    // Entra ID reads the resource as everything before the last `/`: the slash stays.
    assert_eq!(form["scope"], "https://management.azure.com//.default");
    assert_eq!(
        form["client_assertion"],
        "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2EifQ.c2ln"
    );
    assert_eq!(form["client_assertion_type"], JWT_BEARER);

    // The kubelet rotates the file; the next exchange sends the new one.
    std::fs::write(
        &token_file,
        "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJyb3RhdGVkIn0.c2ln",
    )
    .unwrap();
    source
        .fetch_once(
            &emulator,
            &ManagedIdentity::SystemAssigned,
            "https://vault.azure.net",
        )
        .await
        .unwrap();
    let form = form_fields(&emulator.requests()[1]);
    assert_eq!(form["client_id"], "default-client");
    assert!(form["client_assertion"].contains("eyJzdWIiOiJyb3RhdGVkIn0"));

    let error = source
        .fetch_once(
            &emulator,
            &ManagedIdentity::ObjectId("o".into()),
            "https://vault.azure.net",
        )
        .await;
    assert!(
        matches!(error, Err(TokenError::UnsupportedIdentity(_))),
        "{error:?}"
    );
    std::fs::remove_dir_all(directory).unwrap();
}

#[tokio::test]
async fn a_service_principal_signs_a_verifiable_client_assertion() {
    let emulator = Emulator::in_memory();
    let certificate = ClientCertificate::from_pem(TEST_CERTIFICATE).unwrap();
    let source = Source::ClientCertificate {
        authority_host: emulator.base_url(),
        tenant_id: "tenant".into(),
        client_id: "sp-client".into(),
        certificate: certificate.clone(),
    };
    source
        .fetch_once(
            &emulator,
            &ManagedIdentity::SystemAssigned,
            "https://vault.azure.net",
        )
        .await
        .unwrap();
    let form = form_fields(&emulator.requests()[0]);
    let assertion = &form["client_assertion"];
    let parts: Vec<&str> = assertion.split('.').collect();
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
    assert_eq!(header["alg"], "RS256");
    assert_eq!(
        URL_SAFE_NO_PAD
            .decode(header["x5t"].as_str().unwrap())
            .unwrap(),
        [
            0x1B, 0x24, 0x52, 0x91, 0x8C, 0x46, 0x69, 0x96, 0x1A, 0x25, 0x0D, 0xE0, 0xFE, 0xCE,
            0xF9, 0xC8, 0x95, 0x80, 0x17, 0x72
        ]
    );
    let claims = claims(assertion);
    assert_eq!(
        claims["aud"],
        format!("{}/tenant/oauth2/v2.0/token", emulator.base_url())
    );
    assert_eq!(claims["iss"], "sp-client");
    assert_eq!(claims["sub"], "sp-client");
    let public_key = {
        use rustls_pki_types::pem::PemObject as _;
        let der = rustls_pki_types::PrivateKeyDer::from_pem_slice(TEST_CERTIFICATE).unwrap();
        rsa::RsaPrivateKey::from_pkcs8_der(der.secret_der())
            .or_else(|_| rsa::RsaPrivateKey::from_pkcs1_der(der.secret_der()))
            .unwrap()
            .to_public_key()
    };
    let signed = format!("{}.{}", parts[0], parts[1]);
    public_key
        .verify(
            rsa::Pkcs1v15Sign::new::<sha2::Sha256>(),
            &<sha2::Sha256 as sha2::Digest>::digest(signed.as_bytes()),
            &URL_SAFE_NO_PAD.decode(parts[2]).unwrap(),
        )
        .expect("the assertion verifies with the certificate's key");

    // A client secret goes in the form instead; the principal is fixed.
    let secret = Source::ClientSecret {
        authority_host: emulator.base_url(),
        tenant_id: "tenant".into(),
        client_id: "sp-client".into(),
        secret: Secret::new("s3cret"),
    };
    secret
        .fetch_once(
            &emulator,
            &ManagedIdentity::ClientId("sp-client".into()),
            "https://vault.azure.net",
        )
        .await
        .unwrap();
    let form = form_fields(&emulator.requests()[1]);
    assert_eq!(form["client_secret"], "s3cret");
    let other = secret
        .fetch_once(
            &emulator,
            &ManagedIdentity::ClientId("someone-else".into()),
            "r",
        )
        .await;
    assert!(matches!(other, Err(TokenError::UnsupportedIdentity(_))));
}

#[test]
fn identities_parse_from_their_display_form() {
    for identity in [
        ManagedIdentity::SystemAssigned,
        ManagedIdentity::ClientId("c".into()),
        ManagedIdentity::ObjectId("o".into()),
        ManagedIdentity::ResourceId("/subscriptions/s/x=y".into()),
    ] {
        assert_eq!(
            identity.to_string().parse::<ManagedIdentity>().unwrap(),
            identity
        );
    }
    assert!("client_id=".parse::<ManagedIdentity>().is_err());
    assert!("user".parse::<ManagedIdentity>().is_err());
}
