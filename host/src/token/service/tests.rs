#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

//! Both protocols through [`TokenService::handle`] against the in-memory emulator: the App
//! Service shape and refusals, one allow-list and cache for both, and CAE refreshes.

use std::sync::Arc;

use serde_json::Value;

use super::*;
use crate::token::ProviderConfig;
use azgate_emulator::{DEFAULT_IDENTITY_HEADER, Emulator};

const SECRET: &str = "service-secret-\u{1F511}";
const MIRID: &str = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/a";

fn imds_backed(emulator: &Emulator) -> TokenService {
    let source = Source::Imds {
        endpoint: emulator.base_url(),
    };
    TokenService::new(TokenProvider::new(
        source,
        Arc::new(emulator.clone()),
        ProviderConfig::default(),
    ))
}

fn get(path_and_query: &str, headers: &[(&str, &[u8])]) -> Request<Bytes> {
    let mut request = Request::get(path_and_query);
    for (name, value) in headers {
        request = request.header(*name, http::HeaderValue::from_bytes(value).unwrap());
    }
    request.body(Bytes::new()).unwrap()
}

fn app_service(query: &str) -> Request<Bytes> {
    get(
        &format!("/msi/token?{query}"),
        &[("X-IDENTITY-HEADER", SECRET.as_bytes())],
    )
}

fn imds(query: &str) -> Request<Bytes> {
    get(
        &format!("/metadata/identity/oauth2/token?api-version=2018-02-01&{query}"),
        &[("Metadata", b"true")],
    )
}

fn json(response: &Response<Bytes>) -> Value {
    serde_json::from_slice(response.body()).unwrap()
}

fn token_of(response: &Response<Bytes>) -> String {
    assert_eq!(response.status(), 200, "{}", json(response));
    json(response)["access_token"].as_str().unwrap().to_owned()
}

fn encoded(value: &str) -> String {
    form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

#[track_caller]
fn assert_app_service_error(response: &Response<Bytes>, status: u16) {
    assert_eq!(response.status(), status);
    let body = json(response);
    assert_eq!(body["statusCode"], status, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    let id = body["correlationId"].as_str().unwrap();
    assert_eq!(id.len(), 36, "{id}");
    assert_eq!(id.matches('-').count(), 4, "{id}");
}

#[tokio::test]
async fn app_service_answers_in_its_shape_from_the_same_cache_as_imds() {
    let emulator = Emulator::in_memory();
    let service = imds_backed(&emulator).with_app_service_header(Secret::new(SECRET));

    let response = service
        .handle(app_service(
            "api-version=2019-08-01&resource=https://vault.azure.net&client_id=c1",
        ))
        .await;
    let body = json(&response);
    assert_eq!(response.status(), 200, "{body}");
    assert!(body["expires_on"].is_u64(), "an integer: {body}");
    assert!(body.get("expires_in").is_none());
    assert_eq!(body["resource"], "https://vault.azure.net");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["client_id"], "c1");

    // The IMDS protocol gets the same cached token; the path is matched ignoring case.
    let via_imds = service
        .handle(imds("resource=https://vault.azure.net&client_id=c1"))
        .await;
    assert_eq!(token_of(&via_imds), body["access_token"]);
    let upper = service
        .handle(get(
            "/MSI/token?api-version=2019-08-01&resource=https://vault.azure.net&client_id=c1",
            &[("x-identity-header", SECRET.as_bytes())],
        ))
        .await;
    assert_eq!(token_of(&upper), body["access_token"]);
    // One trailing slash is the same path (msal-node sends it on the IMDS path).
    let slash = service
        .handle(get(
            "/metadata/identity/oauth2/token/?api-version=2018-02-01&resource=https://vault.azure.net&client_id=c1",
            &[("Metadata", b"true")],
        ))
        .await;
    assert_eq!(token_of(&slash), body["access_token"]);

    // principal_id (Go) and object_id (MSAL Python) name the same identity; so do mi_res_id
    // and msi_res_id. No client_id is made up when it is not known.
    let by_principal = service
        .handle(app_service(
            "api-version=2019-08-01&resource=r&principal_id=o1",
        ))
        .await;
    let by_object = service
        .handle(app_service(
            "api-version=2019-08-01&resource=r&object_id=o1",
        ))
        .await;
    assert_eq!(token_of(&by_principal), token_of(&by_object));
    assert!(json(&by_object).get("client_id").is_none());
    let query = format!(
        "api-version=2019-08-01&resource=r&mi_res_id={}",
        encoded(MIRID)
    );
    let by_mi = service.handle(app_service(&query)).await;
    let by_msi = service
        .handle(imds(&format!("resource=r&msi_res_id={}", encoded(MIRID))))
        .await;
    assert_eq!(token_of(&by_mi), token_of(&by_msi));
    assert_eq!(emulator.token_requests(), 3);
    let upstream = emulator.requests();
    assert!(
        upstream[1].path_and_query.contains("object_id=o1"),
        "{upstream:?}"
    );
}

#[tokio::test]
async fn app_service_refusals_are_its_json_errors_and_never_reach_the_source() {
    let emulator = Emulator::in_memory();

    // Off without a secret, saying how to turn it on.
    let off = imds_backed(&emulator)
        .handle(app_service("api-version=2019-08-01&resource=r"))
        .await;
    assert_app_service_error(&off, 404);
    assert!(
        json(&off)["message"]
            .as_str()
            .unwrap()
            .contains("--app-service-header-file")
    );

    let service = imds_backed(&emulator)
        .with_app_service_header(Secret::new(SECRET))
        .with_allowed_identities([ManagedIdentity::ClientId("c1".into())]);
    let ok = "/msi/token?api-version=2019-08-01&resource=r&client_id=c1";
    let secret = SECRET.as_bytes();
    let long = "r".repeat(5000);
    /// (path and query, headers, expected status)
    type Case<'a> = (String, Vec<(&'a str, &'a [u8])>, u16);
    let cases: Vec<Case<'_>> = vec![
        (ok.into(), vec![], 401),
        (ok.into(), vec![("x-identity-header", b"wrong")], 401),
        (
            ok.into(),
            vec![("x-identity-header", &secret[..secret.len() - 1])],
            401,
        ),
        (
            ok.into(),
            vec![("x-identity-header", b"\xff\xfe not utf-8")],
            401,
        ),
        (
            ok.into(),
            vec![("x-identity-header", secret), ("x-identity-header", secret)],
            401,
        ),
        // IMDS's header is no substitute.
        (ok.into(), vec![("metadata", b"true")], 401),
        (
            "/msi/token?resource=r&client_id=c1".into(),
            vec![("x-identity-header", secret)],
            400,
        ),
        (
            "/msi/token?api-version=2018-02-01&resource=r&client_id=c1".into(),
            vec![("x-identity-header", secret)],
            400,
        ),
        (
            "/msi/token?api-version=2019-08-01&client_id=c1".into(),
            vec![("x-identity-header", secret)],
            400,
        ),
        (
            format!("{ok}&resource=s"),
            vec![("x-identity-header", secret)],
            400,
        ),
        (
            format!("{ok}&object_id=o"),
            vec![("x-identity-header", secret)],
            400,
        ),
        (
            "/msi/token?api-version=2019-08-01&resource=r&object_id=o&principal_id=o".into(),
            vec![("x-identity-header", secret)],
            400,
        ),
        (
            "/msi/token?api-version=2019-08-01&resource=r&client_id=".into(),
            vec![("x-identity-header", secret)],
            400,
        ),
        (
            format!("/msi/token?api-version=2019-08-01&client_id=c1&resource={long}"),
            vec![("x-identity-header", secret)],
            400,
        ),
        (
            format!("{ok}&token_sha256_to_refresh=abc"),
            vec![("x-identity-header", secret)],
            400,
        ),
        // The allow-list is the IMDS path's.
        (
            "/msi/token?api-version=2019-08-01&resource=r".into(),
            vec![("x-identity-header", secret)],
            403,
        ),
        (
            "/msi/token?api-version=2019-08-01&resource=r&client_id=c2".into(),
            vec![("x-identity-header", secret)],
            403,
        ),
    ];
    for (path, headers, status) in &cases {
        let response = service.handle(get(path, headers)).await;
        assert_eq!(
            response.status(),
            *status,
            "{path} {headers:?}: {}",
            json(&response)
        );
        assert_app_service_error(&response, *status);
    }
    let mut post = app_service("api-version=2019-08-01&resource=r&client_id=c1");
    *post.method_mut() = Method::POST;
    assert_app_service_error(&service.handle(post).await, 405);
    assert_eq!(emulator.token_requests(), 0);
    // And the IMDS path applies the same allow-list.
    assert_eq!(
        service
            .handle(imds("resource=r&client_id=c2"))
            .await
            .status(),
        403
    );
    assert_eq!(
        token_of(&service.handle(app_service(&ok[11..])).await)
            .split('.')
            .count(),
        3
    );
}

#[tokio::test]
async fn a_cae_refresh_replaces_only_the_token_it_names() {
    let emulator = Emulator::in_memory();
    let service = imds_backed(&emulator).with_app_service_header(Secret::new(SECRET));
    let query = "resource=https://management.azure.com/&client_id=c1";
    let first = token_of(&service.handle(imds(query)).await);

    // A hash of something else, of the right shape, changes nothing.
    let other = TokenSha256::of("not the cached token");
    let same = service
        .handle(imds(&format!("{query}&token_sha256_to_refresh={other}")))
        .await;
    assert_eq!(token_of(&same), first);
    assert_eq!(emulator.token_requests(), 1);

    // The cached token's hash evicts it: a new token from the source.
    let hash = TokenSha256::of(&first);
    let second = token_of(
        &service
            .handle(imds(&format!("{query}&token_sha256_to_refresh={hash}")))
            .await,
    );
    assert_ne!(second, first);
    assert_eq!(emulator.token_requests(), 2);

    // The old hash again (a second client that saw the same challenge) gets the new token
    // from the cache; so does the App Service protocol.
    let again = service
        .handle(imds(&format!("{query}&token_sha256_to_refresh={hash}")))
        .await;
    assert_eq!(token_of(&again), second);
    let app = service
        .handle(app_service(&format!(
            "api-version=2019-08-01&{query}&token_sha256_to_refresh={hash}&xms_cc=cp1"
        )))
        .await;
    assert_eq!(token_of(&app), second);
    assert_eq!(emulator.token_requests(), 2);

    // On the App Service protocol too, the current token's hash refreshes it.
    let third = token_of(
        &service
            .handle(app_service(&format!(
                "api-version=2019-08-01&{query}&token_sha256_to_refresh={}",
                TokenSha256::of(&second)
            )))
            .await,
    );
    assert!(third != second && third != first);
    assert_eq!(service.provider.metrics().cae_refreshes, 2);
    let metrics = service.handle(get("/metrics", &[])).await;
    assert!(
        String::from_utf8_lossy(metrics.body()).contains("azgate_token_cae_refreshes_total 2"),
        "{metrics:?}"
    );

    // A malformed hash is refused (IMDS-shaped on the IMDS path) before any lookup.
    for bad in [
        "abc".to_owned(),
        TokenSha256::of(&third).to_string().to_uppercase(),
        format!("{}x", &TokenSha256::of(&third).to_string()[..63]),
        String::new(),
    ] {
        let response = service
            .handle(imds(&format!(
                "{query}&token_sha256_to_refresh={}",
                encoded(&bad)
            )))
            .await;
        assert_eq!(response.status(), 400, "{bad}");
        assert_eq!(json(&response)["error"], "invalid_request");
    }
    let twice = service
        .handle(imds(&format!(
            "{query}&token_sha256_to_refresh={other}&token_sha256_to_refresh={other}"
        )))
        .await;
    assert_eq!(twice.status(), 400);
    assert_eq!(emulator.token_requests(), 3);
}

#[tokio::test]
async fn an_app_service_source_is_sent_the_rejected_tokens_hash() {
    let emulator = Emulator::in_memory();
    let source = Source::AppService {
        endpoint: emulator.identity_endpoint(),
        header: Secret::new(DEFAULT_IDENTITY_HEADER),
    };
    let service = TokenService::new(TokenProvider::new(
        source,
        Arc::new(emulator.clone()),
        ProviderConfig::default(),
    ));
    let first = token_of(
        &service
            .handle(imds("resource=https://vault.azure.net"))
            .await,
    );
    let hash = TokenSha256::of(&first);
    let second = token_of(
        &service
            .handle(imds(&format!(
                "resource=https://vault.azure.net&token_sha256_to_refresh={hash}"
            )))
            .await,
    );
    assert_ne!(first, second);
    let requests = emulator.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0].query_param("token_sha256_to_refresh"), None);
    assert_eq!(
        requests[1].query_param("token_sha256_to_refresh"),
        Some(hash.to_string())
    );
    // The client's other CAE parameters are not forwarded.
    assert_eq!(requests[1].query_param("xms_cc"), None);
}

#[tokio::test]
async fn resource_ids_can_be_asked_for_by_client_id() {
    let emulator = Emulator::in_memory();
    let service = imds_backed(&emulator)
        .with_allowed_identities([ManagedIdentity::ResourceId(MIRID.into())])
        .with_client_ids([(MIRID.to_uppercase(), "wi-client".to_owned())]);
    let response = service
        .handle(imds(&format!("resource=r&msi_res_id={}", encoded(MIRID))))
        .await;
    token_of(&response);
    let upstream = emulator.requests();
    assert_eq!(
        upstream[0].query_param("client_id").as_deref(),
        Some("wi-client")
    );
    assert_eq!(upstream[0].query_param("msi_res_id"), None);
    // The allow-list still names the identity as requested.
    assert_eq!(
        service
            .handle(imds("resource=r&client_id=wi-client"))
            .await
            .status(),
        403
    );
}
